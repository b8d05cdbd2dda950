//! The tenant firewall: iptables and ip6tables chains `HEXA-*` in the `mangle` table and ipsets
//! `hx-*` in the node's network namespace.
//!
//! # What it enforces
//! On every node, for the tenants the node hosts:
//! - traffic with both ends in the pod CIDR is dropped unless both ends are pods of the same tenant or
//!   one end is a system pod (DNS, ingress). Same-node traffic over the CNI bridge is seen too: the
//!   agent keeps `net.bridge.bridge-nf-call-iptables` and `-ip6tables` on;
//! - no pod (system pods included) opens a connection to a management CIDR, whether the management
//!   host is elsewhere (`FORWARD`) or is one of this node's own addresses (`INPUT`);
//! - pods open connections to node addresses (every node's, this node's own and its bridge gateway
//!   included) only on the ports of the spec's node services (the Kubernetes API on servers; the
//!   kubelet for system pods only). A NodePort of another node (which may lead to a management host),
//!   its kubelet, etcd, the agent and the overlay's VXLAN port are all node addresses;
//! - a pod sends only with its own address from its own bridge port, and an address of this node's
//!   pod subnet arriving from anywhere but the bridge (the overlay) is forged: both are dropped before
//!   anything else is looked at;
//! - the cluster's pod network is IPv4: every IPv6 packet from the pod bridge is dropped, bridged,
//!   routed or to the node;
//! - the node itself is never restricted: there is no jump from `OUTPUT`, and rules only ever match
//!   packets from the pod CIDR or the pod bridge. Host-network pods are the node, and are not restricted.
//!
//! # How
//! One ipset `hx-t-<id>` (`hash:ip`) per tenant hosted here, holding that tenant's pod IPs
//! cluster-wide, `hx-sys` for the system pods, `hx-nodes` for the node addresses and `hx-s-<name>`
//! per node service; so the rule count grows with the tenants on the node and with this node's own
//! pods (one anti-spoofing rule each, at most the node's pod capacity), never with the cluster's
//! pods. Chains (mangle table):
//!
//! ```text
//! FORWARD  -> HEXA-FWD  (first rule)        INPUT -> HEXA-IN (first rule)
//! HEXA-FWD: from the bridge HEXA-SPOOF                              HEXA-IN: the same two
//!           src in this node's pod subnet, not from the bridge DROP
//!           RELATED,ESTABLISHED RETURN                              RELATED,ESTABLISHED RETURN
//!           pods -> each management DROP                            pods -> each management DROP
//!           pods -> hx-nodes HEXA-NODE                              pods -> HEXA-NODE
//!           pods -> pods HEXA-POD
//! HEXA-SPOOF: per local pod, its address from its bridge port RETURN; DROP
//! HEXA-NODE: each node service's port on hx-s-<name> RETURN (from hx-sys only if system-only); DROP
//! HEXA-POD:  src in hx-sys RETURN; dst in hx-sys RETURN
//!            src and dst in hx-t-<id> RETURN (one rule per tenant); DROP
//! ip6 HEXA-FWD, HEXA-IN: from the bridge DROP
//! ```
//!
//! Our chains only ever `DROP` or `RETURN`, never `ACCEPT`: whatever we let through still meets the
//! `filter` rules (K3s network policies, flannel, kube-proxy), so a tenant's own `NetworkPolicy`
//! keeps working. And because `mangle` runs before `filter` at both hooks, our DROP is final even
//! when another program (kube-router) puts an ACCEPT first in `filter`. Our jumps are kept first in
//! mangle's `FORWARD` and `INPUT`; a reconcile that only has to move them back is counted as a
//! displacement ([`Reconciled::Applied::displaced`]), so a fight with another program shows.
//!
//! # Applying
//! [`Ruleset::desired`] turns the spec and the node's own pods ([`LocalPods`]) into the state we
//! want; [`Ruleset::from_saves`] reads what the kernel has (`iptables-save`, `ip6tables-save`,
//! `ipset save`, keeping only what is ours); [`plan()`] compares the two and, when they differ,
//! renders one [`Batch`], applied in four steps:
//! 1. `ipset restore`: sets that are new are created and filled; sets whose members changed are
//!    rebuilt as `<set>-new`, then `swap`ped in (atomic per set) and the old content destroyed;
//! 2. `iptables-restore --noflush`: one transaction per table (one `COMMIT`) that rewrites only the
//!    chains that differ (declaring a chain flushes it), fixes our jumps and deletes stale `HEXA-*`
//!    chains (an older agent's in `filter` too); it never flushes a table or touches anyone else's chain;
//! 3. `ip6tables-restore --noflush`: the same for IPv6;
//! 4. `ipset restore`: sets nothing refers to any more (a removed tenant's) are destroyed, only now
//!    that the rules that used them are gone.
//!
//! A reconcile that finds no drift writes nothing. At no point in a batch are the rules looser than
//! both the old and the new state: new sets exist before rules name them, old sets go after.
//!
//! Not covered: dual-stack pod networks (the pod CIDR is IPv4; pods' IPv6 is dropped); NodePort
//! traffic that another node has masqueraded arrives with a node address and counts as external.
//!
//! # Modules
//! - `ruleset`: [`Ruleset`] and [`LocalPods`], what we want and what the kernel has, in one canonical spelling;
//! - `plan`: [`drift`] and [`plan()`], the differences and the [`Batch`] that removes them;
//! - `system`: [`SystemFirewall`], the kernel through `iptables-restore` and `ipset restore`;
//! - `memory`, `recording`: [`MemoryFirewall`], an in-memory kernel, and [`Recording`], which keeps
//!   every batch applied through a firewall, for tests and dry runs;
//! - [`bench`](mod@bench): the batch against one command per rule.

use hexa_shared::isolation::{IsolationError, IsolationSpec};
use tracing::{debug, info, warn};

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
pub use plan::{Batch, Drift, displaced, drift, plan, render};
#[cfg(any(test, feature = "testing"))]
pub use recording::Recording;
pub use ruleset::{
    ChainRef, DEFAULT_BRIDGE, Family, IpSet, Jump, LocalPods, Ruleset, Table, normalize_rule, service_set_name,
    tenant_set_name,
};
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
/// Pods to node addresses: only the node services.
pub const NODE_CHAIN: &str = "HEXA-NODE";
/// Every node's addresses.
pub const NODES_SET: &str = "hx-nodes";
/// Packets from the pod bridge: each local pod's address only from its own bridge port.
pub const SPOOF_CHAIN: &str = "HEXA-SPOOF";
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
    #[error("{0:?} is not a network interface name (1 to 15 characters, no spaces, '/', ',' or quotes)")]
    BadInterface(String),
    #[error(
        "cannot turn on {setting}: {why} (load the bridge netfilter module: modprobe br_netfilter; K3s needs it too)"
    )]
    BridgeFiltering { setting: String, why: String },
}

/// Where the rules live: the kernel (through the iptables and ipset tools) or a fake.
pub trait Firewall {
    /// Our chains, the jumps into them and our sets as they are now.
    fn current(&self) -> Result<Ruleset, FirewallError>;
    /// Runs the batch's steps in order, stopping at the first that fails.
    fn apply(&self, batch: &Batch) -> Result<(), FirewallError>;
    /// Makes bridged pod traffic meet the IPv4 and IPv6 hooks (`net.bridge.bridge-nf-call-iptables`
    /// and `-ip6tables` = 1), writing only when one is off; true when it wrote.
    fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError>;
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing differed; nothing was written.
    Unchanged,
    /// One batch was applied to correct this drift, and reading back found no drift left.
    Applied {
        drift: Drift,
        /// Only our jumps had to be put back first: another program moved or removed them.
        displaced: bool,
    },
}

/// Brings the firewall to `desired`: reads the current state, writes nothing when it matches, and
/// otherwise applies one batch and reads back to check that it took.
pub fn reconcile<F: Firewall + ?Sized>(firewall: &F, desired: &Ruleset) -> Result<Reconciled, FirewallError> {
    if *desired != Ruleset::default() && firewall.ensure_bridge_filtering()? {
        info!("bridged pod traffic now meets the firewall (bridge-nf-call-iptables and -ip6tables on)");
    }
    let current = firewall.current()?;
    let Some(batch) = plan(desired, &current) else {
        debug!(rules = desired.rule_count(), sets = desired.sets.len(), "firewall has no drift");
        return Ok(Reconciled::Unchanged);
    };
    let found = drift(desired, &current);
    let displaced = displaced(desired, &current);
    firewall.apply(&batch)?;
    let left = drift(desired, &firewall.current()?);
    if !left.is_empty() {
        return Err(FirewallError::NotConverged(left));
    }
    if displaced {
        warn!(drift = %found, "another program moved or removed our jumps; put back first");
    } else {
        info!(drift = %found, rules = desired.rule_count(), sets = desired.sets.len(), "firewall reconciled");
    }
    Ok(Reconciled::Applied { drift: found, displaced })
}

/// [`reconcile`] to the state of `spec` on a node whose own pods are `local`.
pub fn reconcile_spec<F: Firewall + ?Sized>(
    firewall: &F,
    spec: &IsolationSpec,
    local: &LocalPods,
) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::desired(spec, local)?)
}

/// Removes every chain, jump and set of ours (the agent being uninstalled).
pub fn teardown<F: Firewall + ?Sized>(firewall: &F) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::default())
}

#[cfg(test)]
mod tests;
