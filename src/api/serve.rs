//! How the API holds up against many, slow or greedy clients: a cap on open connections, a
//! deadline for a request's headers and body (a client that sends half a request and stalls is
//! dropped), a cap on request bodies (413), caps on live event followers per client address and
//! overall (429), and an accept loop that logs running out of file descriptors and tries again
//! after a pause instead of failing or spinning.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ApiError;

/// Connections served at once; more wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers, and then its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body (a build request or a git hook payload). NATS's default
/// `max_payload` is 1 MiB too, so a larger build request could not be published anyway.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Live `GET /v1/builds/{id}/events` streams per client address.
pub const FOLLOWERS_PER_CLIENT: usize = 16;
/// Live event streams overall: half the connections, so followers cannot starve submissions.
pub const FOLLOWERS_TOTAL: usize = MAX_CONNECTIONS / 2;
/// The pause after a failed accept (out of file descriptors, out of memory).
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// How often "at the connection cap" is logged at most.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The bounds the API enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub max_body_bytes: usize,
    pub followers_per_client: usize,
    pub followers_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
            max_body_bytes: MAX_BODY_BYTES,
            followers_per_client: FOLLOWERS_PER_CLIENT,
            followers_total: FOLLOWERS_TOTAL,
        }
    }
}

/// The address of the client a request came from, put into each request by [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl ClientAddr {
    /// The address followers are counted under: all requests that did not come through
    /// [`serve`] share one.
    pub fn ip(addr: Option<&ClientAddr>) -> IpAddr {
        addr.map(|a| a.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// Serve `router` on `listener` within `limits` until `shutdown` completes; then stop
/// accepting, let open requests finish and return once every connection has closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    // Connections hold a receiver; shutdown waits until all are dropped.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut cap_logged: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        if permits.available_permits() == 0
            && cap_logged.is_none_or(|t| t.elapsed() > CAP_LOG_INTERVAL)
        {
            tracing::warn!(
                "api on {local}: {} connections open, the most it serves at once; new ones wait until one closes",
                limits.max_connections
            );
            cap_logged = Some(Instant::now());
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
            _ = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => {
                tracing::debug!("api on {local}: a connection closed before it was accepted: {e}");
                continue;
            }
            Err(e) => {
                let help = match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        ": the process is out of file descriptors; raise its open-file limit (`ulimit -n`, systemd's LimitNOFILE=) or lower the load"
                    }
                    _ => "",
                };
                tracing::warn!(
                    "api on {local}: cannot accept a connection ({e}); trying again in {} s{help}",
                    ACCEPT_PAUSE.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_PAUSE) => {}
                    _ = &mut shutdown => break,
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(axum::Extension(ClientAddr(peer))),
        );
        let read_timeout = limits.read_timeout;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout);
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!("api: connection from {peer} ended: {e}");
                        }
                        break;
                    }
                    changed = stop.changed(), if !stopping => {
                        stopping = true;
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}

/// Errors of one connection that leave the listener fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    )
}

/// Read a request body of at most `limits.max_body_bytes` within `limits.read_timeout`:
/// 413 for a larger one (at once when its Content-Length says so), 408 for one that does not
/// arrive in time. Both answers close the connection.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<Bytes, ApiError> {
    let max = limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the request body is larger than {max} bytes, the most this API reads; a build request names its recipe (path or git) instead of carrying large files"
            ),
        )
        .closing()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut data = body.into_data_stream();
        let mut out = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid(None, format!("reading the request body failed: {e}")).closing()
            })?;
            if out.len() + chunk.len() > max {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(limits.read_timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s; send the whole request at once",
                    limits.read_timeout.as_secs_f64()
                ),
            )
            .closing()
        })?
}

/// Who follows build events live: counts per client address and overall.
#[derive(Debug, Default)]
pub struct Followers {
    counts: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

/// One live follower; its place is given back when dropped (the event stream ended or the
/// client went away).
#[derive(Debug)]
pub struct FollowerSlot {
    followers: Arc<Followers>,
    ip: IpAddr,
}

impl Followers {
    /// Take a place for a follower from `ip`, or say why there is none (429).
    pub fn follow(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<FollowerSlot, ApiError> {
        let mut guard = self.counts.lock().map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the follower count is unusable after a panic; restart `kiln up`",
            )
        })?;
        let (per_client, total) = &mut *guard;
        let mine = per_client.get(&ip).copied().unwrap_or(0);
        if mine >= limits.followers_per_client {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_followers",
                format!(
                    "{ip} already follows {mine} event streams here, the most one client address may; close one, or poll GET /v1/builds/{{id}} instead"
                ),
            ));
        }
        if *total >= limits.followers_total {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_followers",
                format!(
                    "this server already serves {total} event streams, the most it serves at once; try again later, or poll GET /v1/builds/{{id}} instead"
                ),
            ));
        }
        per_client.insert(ip, mine + 1);
        *total += 1;
        Ok(FollowerSlot {
            followers: self.clone(),
            ip,
        })
    }

    /// Live followers: (from `ip`, overall).
    pub fn count(&self, ip: IpAddr) -> (usize, usize) {
        self.counts
            .lock()
            .map(|g| (g.0.get(&ip).copied().unwrap_or(0), g.1))
            .unwrap_or((0, 0))
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let Ok(mut guard) = self.followers.counts.lock() else {
            return;
        };
        let (per_client, total) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per_client.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_client.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_are_capped_per_client_and_overall_and_freed_on_drop() {
        let limits = Limits {
            followers_per_client: 2,
            followers_total: 3,
            ..Limits::default()
        };
        let f = Arc::new(Followers::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = f.follow(a, &limits).unwrap();
        let _a2 = f.follow(a, &limits).unwrap();
        let e = f.follow(a, &limits).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(e.message.contains("10.0.0.1 already follows 2"), "{e}");
        let _b1 = f.follow(b, &limits).unwrap();
        let e = f.follow(b, &limits).unwrap_err();
        assert!(e.message.contains("already serves 3"), "{e}");
        assert_eq!(f.count(a), (2, 3));
        drop(a1);
        assert_eq!(f.count(a), (1, 2));
        let _b2 = f.follow(b, &limits).unwrap();
        assert_eq!(f.count(b), (2, 3));
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit() {
        let limits = Limits {
            max_body_bytes: 4,
            ..Limits::default()
        };
        let none = HeaderMap::new();
        let ok = read_body(Body::from("abcd"), &none, &limits).await.unwrap();
        assert_eq!(&ok[..], b"abcd");
        let e = read_body(Body::from("abcde"), &none, &limits)
            .await
            .unwrap_err();
        assert_eq!(
            (e.status, e.kind),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        );
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, "5000".parse().unwrap());
        let e = read_body(Body::empty(), &declared, &limits)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
