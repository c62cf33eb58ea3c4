//! The build pipeline: the stages, one file each under `stages` (each result recorded by a key
//! over its inputs in `records`), run in process (`build`, `kiln build --no-bus`) and, on NATS,
//! by workers (`worker`); `kiln build` over NATS (`bus_build`); what the messages say
//! (`events`); what requests may reach on a host (`access`); what a runner does about a lost or
//! damaged blob (`recovery`).

pub mod access;
pub mod build;
pub mod bus_build;
pub mod events;
pub mod handoff;
pub mod records;
pub mod recovery;
pub mod stages;
pub mod worker;
