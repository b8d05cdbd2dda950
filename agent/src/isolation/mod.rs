//! Tenant isolation on the node, from the `IsolationSpec` in the node's desired state
//! (`hexa_shared::isolation`).
//!
//! - [`firewall`]: iptables chains `HEXA-*` and ipsets `hx-*` that keep tenants' pods apart and away
//!   from the management networks, applied as one atomic batch and reconciled against drift.

pub mod firewall;
