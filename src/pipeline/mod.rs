//! The build pipeline: stages as functions of their inputs, each result cached by a key over
//! those inputs, run in process by `kiln build` (and, later, by workers on NATS).

pub mod build;
pub mod cache;
