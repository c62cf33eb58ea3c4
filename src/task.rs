//! Running blocking work (file hashing, disk and store I/O) from async code without stalling
//! the runtime: one `spawn_blocking` wrapper that keeps the caller's error type.

/// Run `f` on tokio's blocking pool and return its result. A task that panicked or was
/// cancelled becomes the caller's error through `E: From<JoinError>`.
pub async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<tokio::task::JoinError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}
