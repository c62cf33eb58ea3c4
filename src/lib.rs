//! kiln: an OS image build appliance. A recipe goes in; a bootable, verified, signed disk image
//! comes out. See DESIGN.md for the architecture; each module owns one concern.

pub mod agent;
pub mod api;
pub mod boot;
pub mod bounded;
pub mod bus;
pub mod cli;
pub mod debian;
pub mod der;
pub mod digest;
pub mod disk;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod gc;
pub mod home;
pub mod kernel;
pub mod manifest;
pub mod metrics;
pub mod net;
pub mod packages;
pub mod pe;
pub mod pipeline;
pub mod provenance;
pub mod readahead;
pub mod recipe;
pub mod rollout;
pub mod rootfs;
pub mod sbom;
pub mod secureboot;
pub mod source;
pub mod store;
pub mod systemd;
pub mod task;
pub mod time;
pub mod tree;
pub mod uki;
pub mod verify;
pub mod verity;
pub mod watch;
