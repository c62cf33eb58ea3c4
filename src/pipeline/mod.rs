//! The build pipeline: stages as functions of their inputs (`stages`), each result cached by a key
//! over those inputs (`cache`), run in process by `kiln build` (`build`) and, on NATS, by workers.

pub mod build;
pub mod cache;
pub mod stages;
pub mod worker;
