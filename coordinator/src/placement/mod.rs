//! Where tenants live: a pure function from `(config, nodes, tenants, request)` to a [`Decision`].
//!
//! No I/O, no clock, no randomness: the same input gives the same decision. Every collection that
//! is iterated is ordered (`BTreeMap`, `BTreeSet`, vectors sorted by node name), and every tie is
//! broken by node name. The caller persists a decision before acting on it, then commits it with
//! [`PlacementState::apply`].
//!
//! **Shared plan.** The quota is split into `spread` equal shares ([`SharedPlan::share_size`]), each
//! on a different Ready, schedulable node of the shared pool. A node's room is
//! `allocatable x overcommit - headroom - reserved` per resource (headroom is a fraction of
//! allocatable kept free), and its memory room is never more than its live `MemAvailable` less the
//! headroom. Control-plane replicas ride on shares `0..replicas`, so they are on distinct nodes.
//!
//! **Scoring** ([`Strategy::DominantBestFit`]): the share's dominant resource is the one it needs
//! most of relative to the fleet's shared capacity. Among nodes that already hold shares, the share
//! goes to the node with the least room left on that resource after it (best fit), which keeps
//! partly used nodes full and empty nodes empty; only when no used node fits is an empty node
//! opened, the one with the most room (largest first), so fewer nodes are used and big tenants
//! still find room. Kubernetes' LeastAllocated and MostAllocated and first fit are available as
//! baselines ([`baselines`]) for the benchmark (`bench`, behind the `testing` feature).
//!
//! **Speed.** [`PlacementState`] keeps the room of every eligible node in ordered indexes keyed by
//! `(free cpu, node)` and `(free memory, node)`, split into used and empty nodes, and updates only
//! the nodes a decision touches. Best fit is a range query from the share's size upward; opening a
//! node reads the largest empty one. A placement costs `O(spread x log n)` plus the nodes skipped
//! because they fit on the dominant resource but not on another one.
//!
//! **Dedicated plan.** Free dedicated nodes of the class are bound (nodes registered for this
//! tenant first, then unbound ones; never a node bound to another tenant) and the shortfall is asked
//! of the node provisioner as a [`ProvisionRequest`]; the tenant keeps any shares it had until every
//! dedicated node is bound, so a plan change moves it without a gap. Shares never go on dedicated
//! nodes.
//!
//! **Reactions** ([`Request`]): a lost node's shares are re-placed (the tenant's other shares stay
//! put); a cordoned node gets no new shares but keeps what it has; a drained node's shares move off;
//! a plan change (resize, or shared <-> dedicated) keeps every share that still fits where it is;
//! deleting a tenant frees all it held.

pub mod baselines;
/// Benchmark helpers for `hexa-bench`; not part of the release library.
#[cfg(any(test, feature = "testing"))]
pub mod bench;
mod room;
mod state;

use serde::{Deserialize, Serialize};

use hexa_shared::names::Pool;
use hexa_shared::quantity::{format_bytes, format_cpu_millis};
use hexa_shared::report::Resources;
use hexa_shared::tenant::{NodeClass, Placement, Plan, ShareSize, TenantError, validate_node_classes};

pub use room::Room;
pub use state::PlacementState;

/// How nodes are chosen for shares.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Best fit on the share's dominant resource among used nodes; otherwise the largest empty node.
    #[default]
    DominantBestFit,
    /// The first node with room, trying nodes largest first (memory, then CPU, then name): first
    /// fit, or first-fit-decreasing when the caller sorts tenants largest first.
    FirstFit,
    /// Kubernetes' NodeResourcesFit `LeastAllocated` score: spreads.
    LeastAllocated,
    /// Kubernetes' NodeResourcesFit `MostAllocated` score: packs.
    MostAllocated,
}

/// The placement part of the coordinator's configuration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// Ratio of CPU that may be promised to shares relative to allocatable (1.0 = none).
    pub cpu_overcommit: f64,
    /// Ratio for memory; memory is not compressible, so 1.0 unless tenants are known to idle.
    pub memory_overcommit: f64,
    /// Fraction of each shared node's allocatable CPU and memory never given to shares.
    pub headroom: f64,
    pub strategy: Strategy,
    /// The dedicated node classes the platform sells.
    pub node_classes: Vec<NodeClass>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            cpu_overcommit: 2.0,
            memory_overcommit: 1.0,
            headroom: 0.1,
            strategy: Strategy::default(),
            node_classes: NodeClass::defaults(),
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> Result<(), PlacementError> {
        for (key, ratio) in [("cpu_overcommit", self.cpu_overcommit), ("memory_overcommit", self.memory_overcommit)] {
            if !(1.0..=10.0).contains(&ratio) {
                return Err(PlacementError::InvalidConfig(format!(
                    "{key} {ratio} is out of range: use a ratio from 1.0 (no overcommit) to 10.0"
                )));
            }
        }
        if !(0.0..0.5).contains(&self.headroom) {
            return Err(PlacementError::InvalidConfig(format!(
                "headroom {} is out of range: use a fraction from 0.0 to below 0.5 (0.1 keeps 10% of each node free)",
                self.headroom
            )));
        }
        validate_node_classes(&self.node_classes).map_err(|e| PlacementError::InvalidConfig(e.to_string()))
    }
}

/// The pool a node belongs to, as placement sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum NodePool {
    /// Runs the host cluster's control plane: never placed on.
    Server,
    /// Hosts shares of many tenants.
    Shared,
    /// A whole node for one tenant. `tenant` is the tenant the node was enrolled for, if any (a
    /// node enrolled without one is free to bind); `node_class` is the class it was provisioned as
    /// (a node of unknown class is never bound).
    Dedicated { tenant: Option<String>, node_class: Option<String> },
}

impl NodePool {
    /// The placement view of an inventory pool, with the node class the provisioner recorded.
    pub fn from_pool(pool: &Pool, node_class: Option<String>) -> NodePool {
        match pool {
            Pool::Server => NodePool::Server,
            Pool::Shared => NodePool::Shared,
            Pool::Dedicated { tenant } => NodePool::Dedicated { tenant: Some(tenant.clone()), node_class },
        }
    }
}

/// What placement needs to know about one node, from the inventory and its latest report (not to
/// be confused with the admin API's `inventory::NodeView`, which shows a node to an operator).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub pool: NodePool,
    /// Reports arrive (health `Ready`).
    pub ready: bool,
    /// Not cordoned.
    pub schedulable: bool,
    pub allocatable: Resources,
    /// Live `MemAvailable` from the latest report.
    pub memory_available_bytes: u64,
}

/// A tenant's plan and where it is now, as stored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TenantState {
    pub name: String,
    pub plan: Plan,
    pub placement: Placement,
}

/// What happened, and what placement is asked to decide.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Place a new tenant.
    Place { tenant: String, plan: Plan },
    /// Change a tenant's plan: a resize within its kind, or a move between shared and dedicated.
    /// Shares that still fit stay where they are.
    ChangePlan { tenant: String, plan: Plan },
    /// Re-check one tenant: bind dedicated nodes that registered since, finish a move to
    /// dedicated, re-place shares whose node left the inventory.
    Reconcile { tenant: String },
    /// Move every share off a node (which gets no new ones) and replace it for its dedicated tenant.
    DrainNode { node: String },
    /// A node is `Lost`: re-place its shares, replace it for its dedicated tenant.
    NodeLost { node: String },
    /// Remove a tenant and free everything it held.
    Delete { tenant: String },
}

/// Dedicated nodes asked of (or withdrawn from) the node provisioner.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, utoipa::ToSchema)]
pub struct ProvisionRequest {
    pub tenant: String,
    pub node_class: String,
    pub count: u32,
}

/// A share that a drain or node loss could not move; it stays on its node and the tenant is degraded.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub tenant: String,
    pub share: u32,
    pub node: String,
    pub reason: String,
}

/// The outcome of a request. Persist it, act on it, then [`PlacementState::apply`] it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// New plan and placement of every tenant the decision changes, sorted by name.
    pub tenants: Vec<TenantState>,
    /// Tenants deleted.
    pub removed: Vec<String>,
    /// Dedicated nodes to provision.
    pub provision: Vec<ProvisionRequest>,
    /// Outstanding provisioning no longer needed.
    pub cancel: Vec<ProvisionRequest>,
    /// Dedicated nodes no longer bound to any tenant (candidates for deprovisioning), sorted.
    pub released: Vec<String>,
    /// Shares that could not move.
    pub unplaced: Vec<Unplaced>,
}

impl Decision {
    pub fn is_empty(&self) -> bool {
        self == &Decision::default()
    }
}

/// Why a request cannot be satisfied. Messages say what does not fit, with numbers, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("placement configuration: {0}")]
    InvalidConfig(String),
    #[error("node {node} is listed twice in the inventory view: each node name must be unique")]
    DuplicateNode { node: String },
    #[error("tenant {tenant}: {source}")]
    InvalidPlan { tenant: String, source: TenantError },
    #[error("tenant {tenant} already exists: change its plan instead, or choose another name")]
    TenantExists { tenant: String },
    #[error("tenant {tenant} does not exist: check the name, or create it first")]
    UnknownTenant { tenant: String },
    #[error("node {node} is not in the inventory: check the name against the node list")]
    UnknownNode { node: String },
    #[error(
        "tenant {tenant} needs {needed} shared {} and there is no Ready schedulable shared node: enroll shared nodes or uncordon one",
        nodes_word(*needed)
    )]
    NoSharedNodes { tenant: String, needed: u32 },
    #[error(
        "tenant {tenant} needs {needed} distinct Ready schedulable shared nodes (spread {needed}) and only {available} {}: lower spread to {available} or add shared nodes",
        if *available == 1 { "exists" } else { "exist" }
    )]
    TooFewNodes { tenant: String, needed: u32, available: usize },
    #[error(
        "tenant {tenant}: each share needs {share}, more than the largest Ready schedulable shared node can ever hold ({}); {hint}",
        describe_room(largest)
    )]
    ShareTooLarge { tenant: String, share: ShareSize, largest: Room, hint: String },
    #[error(
        "tenant {tenant} needs {needed} {} with {share} free each; only {fitting} Ready schedulable shared {} that room: free capacity, lower spread or shrink the quota",
        nodes_word(*needed),
        if *fitting == 1 { "node has" } else { "nodes have" }
    )]
    NoRoom { tenant: String, needed: u32, share: ShareSize, fitting: usize },
}

fn nodes_word(n: u32) -> &'static str {
    if n == 1 { "node" } else { "nodes" }
}

fn describe_room(room: &Room) -> String {
    format!(
        "{} CPU, {} memory and {} pods after overcommit and headroom",
        format_cpu_millis(room.cpu_millis),
        format_bytes(room.memory_bytes),
        room.pods
    )
}

/// Decides `request` for the given fleet and tenants: builds a [`PlacementState`] and asks it.
/// A long-lived caller keeps the state instead and applies decisions to it.
pub fn decide(
    config: &PlacementConfig,
    nodes: &[NodeState],
    tenants: &[TenantState],
    request: &Request,
) -> Result<Decision, PlacementError> {
    PlacementState::new(config.clone(), nodes.to_vec(), tenants.to_vec())?.decide(request)
}

#[cfg(test)]
mod tests;
