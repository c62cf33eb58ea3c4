//! The build pipeline: stages as functions of their inputs (`stages`), each result cached by a key
//! over those inputs (`cache`), run in process by `kiln build` (`build`) and, on NATS, by workers (`worker`; the publish
//! stage's work is in `publish`).

pub mod build;
pub mod cache;
pub mod publish;
pub mod stages;
pub mod worker;
