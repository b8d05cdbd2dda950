//! The tenant firewall: iptables chains `HEXA-*` and ipsets `hx-*` in the node's network namespace.
//!
//! # What it enforces
//! On every node, for the tenants the node hosts:
//! - traffic with both ends in the pod CIDR is dropped unless both ends are pods of the same tenant or
//!   one end is a system pod (DNS, ingress). Same-node traffic over the CNI bridge is seen too, because
//!   Kubernetes nodes run with `net.bridge.bridge-nf-call-iptables=1`;
//! - no pod (system pods included) opens a connection to a management CIDR, whether the management
//!   host is elsewhere (`FORWARD`) or is one of this node's own addresses (`INPUT`): "never" holds for
//!   the node's addresses too. Management hosts may still open connections to pods; the replies pass;
//! - the node itself is never restricted: there is no jump from `OUTPUT`, and rules only ever match
//!   packets whose source is in the pod CIDR. Host-network pods are the node, and are not restricted.
//!
//! # How
//! One ipset `hx-t-<id>` (`hash:ip`) per tenant hosted here, holding that tenant's pod IPs
//! cluster-wide, and `hx-sys` for the system pods; so the rule count grows with the tenants on the
//! node, never with pods. Chains:
//!
//! ```text
//! FORWARD  -> HEXA-FWD  (first rule)     INPUT -> HEXA-IN (first rule)
//! HEXA-FWD: RELATED,ESTABLISHED RETURN   HEXA-IN: RELATED,ESTABLISHED RETURN
//!           pods -> each management DROP          pods -> each management DROP
//!           pods -> pods  HEXA-POD
//! HEXA-POD: src in hx-sys RETURN; dst in hx-sys RETURN
//!           src and dst in hx-t-<id> RETURN (one rule per tenant)
//!           DROP
//! ```
//!
//! Our chains only ever `DROP` or `RETURN`, never `ACCEPT`: whatever we let through still meets the
//! rules after us in `FORWARD`/`INPUT` (K3s network policies, flannel, kube-proxy), so a tenant's own
//! `NetworkPolicy` keeps working. Our jumps are kept first so that nobody's `ACCEPT` comes before us;
//! a controller that also insists on being first (kube-router) will be moved down at each reconcile.
//!
//! # Applying
//! [`Ruleset::desired`] turns the spec into the state we want; [`Ruleset::from_saves`] reads what
//! the kernel has (`iptables-save`, `ipset save`, keeping only what is ours); [`plan()`] compares the
//! two and, when they differ, renders one [`Batch`], applied in three steps:
//! 1. `ipset restore`: sets that are new are created and filled; sets whose members changed are
//!    rebuilt as `<set>-new`, then `swap`ped in (atomic per set) and the old content destroyed;
//! 2. `iptables-restore --noflush`: one transaction (one `COMMIT`) that rewrites only the chains that
//!    differ (declaring a chain flushes it), fixes our jumps and deletes stale `HEXA-*` chains; it
//!    never flushes a table or touches anyone else's chain;
//! 3. `ipset restore`: sets nothing refers to any more (a removed tenant's) are destroyed, only now
//!    that the rules that used them are gone.
//!
//! A reconcile that finds no drift writes nothing. At no point in a batch are the rules looser than
//! both the old and the new state: new sets exist before rules name them, old sets go after.
//!
//! Not covered: IPv6 (a dual-stack cluster needs the same with `ip6tables`); NodePort and LoadBalancer
//! traffic that another node has masqueraded arrives with a node address and counts as external.
//!
//! # Modules
//! - `ruleset`: [`Ruleset`], what we want and what the kernel has, in one canonical spelling;
//! - `plan`: [`drift`] and [`plan()`], the differences and the [`Batch`] that removes them;
//! - `system`: [`SystemFirewall`], the kernel through `iptables-restore` and `ipset restore`;
//! - `memory`, `recording`: [`MemoryFirewall`], an in-memory kernel, and [`Recording`], which keeps
//!   every batch applied through a firewall, for tests and dry runs;
//! - [`bench`](mod@bench): the batch against one command per rule.

use hexa_shared::isolation::{IsolationError, IsolationSpec};
use tracing::{debug, info};

#[cfg(any(test, feature = "testing"))]
pub mod bench;
#[cfg(any(test, feature = "testing"))]
mod memory;
mod plan;
#[cfg(any(test, feature = "testing"))]
mod recording;
mod ruleset;
mod system;

#[cfg(any(test, feature = "testing"))]
pub use memory::MemoryFirewall;
pub use plan::{Batch, Drift, drift, plan, render};
#[cfg(any(test, feature = "testing"))]
pub use recording::Recording;
pub use ruleset::{IpSet, Jump, Ruleset, normalize_rule, tenant_set_name};
pub use system::{StepTimes, SystemFirewall};

#[cfg(any(test, feature = "testing"))]
use ruleset::tokenize;
#[cfg(test)]
use system::failed_line;

/// Jumped to first from `FORWARD`: traffic the node routes or bridges.
pub const FORWARD_CHAIN: &str = "HEXA-FWD";
/// Jumped to first from `INPUT`: traffic to the node's own addresses.
pub const INPUT_CHAIN: &str = "HEXA-IN";
/// Pod-to-pod traffic: who may talk to whom.
pub const POD_CHAIN: &str = "HEXA-POD";
/// Every chain whose name starts with this is ours.
pub const CHAIN_PREFIX: &str = "HEXA-";
/// Every ipset whose name starts with this is ours.
pub const SET_PREFIX: &str = "hx-";
/// The system pods' set.
pub const SYSTEM_SET: &str = "hx-sys";
/// ipset names are at most 31 characters.
pub const MAX_SET_NAME: usize = 31;
/// Suffix of the set a changed set is rebuilt in before the swap.
const NEW_SUFFIX: &str = "-new";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("isolation spec: {0}")]
    Spec(#[from] IsolationError),
    #[error("tenants {first:?} and {second:?} both map to ipset {set}: rename one of them")]
    SetNameCollision { set: String, first: String, second: String },
    #[error("cannot run `{command}`: {source} (install it: apt-get install -y iptables ipset iproute2)")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}{detail}")]
    Command { command: String, status: String, stderr: String, detail: String },
    #[error("cannot read `{what}` output, line {line:?}: {why}")]
    Parse { what: &'static str, line: String, why: String },
    #[error(
        "the firewall still differs after applying a batch ({0}): another program rewrites our chains or sets, \
         or it uses the other iptables backend (check `iptables --version`: nf_tables or legacy)"
    )]
    NotConverged(Drift),
    #[error("network namespace: {0}")]
    Netns(String),
}

/// Where the rules live: the kernel (through the iptables and ipset tools) or a fake.
pub trait Firewall {
    /// Our chains, the jumps into them and our sets as they are now.
    fn current(&self) -> Result<Ruleset, FirewallError>;
    /// Runs the batch's steps in order, stopping at the first that fails.
    fn apply(&self, batch: &Batch) -> Result<(), FirewallError>;
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing differed; nothing was written.
    Unchanged,
    /// One batch was applied to correct this drift, and reading back found no drift left.
    Applied { drift: Drift },
}

/// Brings the firewall to `desired`: reads the current state, writes nothing when it matches, and
/// otherwise applies one batch and reads back to check that it took.
pub fn reconcile<F: Firewall + ?Sized>(firewall: &F, desired: &Ruleset) -> Result<Reconciled, FirewallError> {
    let current = firewall.current()?;
    let Some(batch) = plan(desired, &current) else {
        debug!(rules = desired.rule_count(), sets = desired.sets.len(), "firewall has no drift");
        return Ok(Reconciled::Unchanged);
    };
    let found = drift(desired, &current);
    firewall.apply(&batch)?;
    let left = drift(desired, &firewall.current()?);
    if !left.is_empty() {
        return Err(FirewallError::NotConverged(left));
    }
    info!(drift = %found, rules = desired.rule_count(), sets = desired.sets.len(), "firewall reconciled");
    Ok(Reconciled::Applied { drift: found })
}

/// [`reconcile`] to the state of `spec`.
pub fn reconcile_spec<F: Firewall + ?Sized>(firewall: &F, spec: &IsolationSpec) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::desired(spec)?)
}

/// Removes every chain, jump and set of ours (the agent being uninstalled).
pub fn teardown<F: Firewall + ?Sized>(firewall: &F) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::default())
}

#[cfg(test)]
mod tests;
