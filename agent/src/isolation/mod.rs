//! Tenant isolation on the node, from the `IsolationSpec` in the node's desired state
//! (`hexa_shared::isolation`).
//!
//! - [`cgroup`]: keeps each tenant's pods within the tenant's allocation on this node (memory,
//!   pids and cpu caps, cpu split by demand, reclaim pressure), on cgroup v2 and v1.
//! - [`firewall`]: iptables chains `HEXA-*` and ipsets `hx-*` that keep tenants' pods apart and away
//!   from the management networks, applied as one atomic batch and reconciled against drift.
//! - [`local_pods`]: which bridge port each of this node's pods sends from (what only the node knows).
//! - [`dry_run`]: a firewall that prints the batch it would apply, for `hexa-agent apply --root`.
//! - [`figures`]: what enforcing isolation costs and how often it is put right, for the reports.

pub mod cgroup;
pub mod dry_run;
pub mod figures;
pub mod firewall;
pub mod local_pods;

pub use dry_run::DryRunFirewall;
