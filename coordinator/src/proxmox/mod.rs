//! Dedicated nodes as Proxmox VE virtual machines.
//!
//! - [`client`]: the Proxmox VE API (token auth, the `{"data": ...}` envelope, task following by
//!   UPID, retries on locks, 5xx and timeouts);
//! - [`provisioner`]: one persisted state machine per VM, from clone to bound node and back to
//!   nothing;
//! - [`seed`]: the NoCloud seed server the VMs' cloud-init reads, and [`userdata`], the pure
//!   rendering of what it serves;
//! - [`settings`]: the `[proxmox]` section of the coordinator's configuration.

pub mod client;
pub mod provisioner;
pub mod seed;
pub mod settings;
mod tls;
pub mod userdata;

pub use client::{ProxmoxClient, ProxmoxError};
pub use provisioner::{Provisioner, VmRecord, VmState};
pub use settings::ProxmoxSettings;
