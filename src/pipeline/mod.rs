//! The build pipeline: stages as functions of their inputs (`stages`), each result cached by a key
//! over those inputs (`cache`), run in process (`build`, `kiln build --no-bus`) and, on NATS, by
//! workers (`worker`; the publish stage's work is in `publish`); `kiln build` over NATS
//! (`bus_build`); what the messages say (`events`); what requests may reach on a worker
//! (`access`).

pub mod access;
pub mod build;
pub mod bus_build;
pub mod cache;
pub mod events;
pub mod publish;
pub mod stages;
pub mod worker;
