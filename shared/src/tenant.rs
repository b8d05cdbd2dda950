//! The tenant model: a tenant is one vCluster, on a shared plan (a CPU/memory/pods quota split into
//! `spread` shares on distinct shared nodes) or a dedicated plan (whole nodes of a node class). This
//! module holds the types the coordinator persists and the API exchanges, and the validation every
//! entry point runs; where a tenant goes is decided by the coordinator's `placement` module.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{NameError, validate_tenant_name};
use crate::quantity::{format_bytes, format_cpu_millis};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Smallest CPU a share may get: below this a vCluster's workloads cannot run usefully.
pub const MIN_SHARE_CPU_MILLIS: u64 = 100;
/// Smallest memory a share may get.
pub const MIN_SHARE_MEMORY_BYTES: u64 = 128 * MIB;
/// Most nodes one shared tenant may be spread over.
pub const MAX_SPREAD: u32 = 64;
/// Most dedicated nodes one tenant may have.
pub const MAX_DEDICATED_NODES: u32 = 64;
/// Share memory is rounded up to whole MiB so that per-node quotas are clean Kubernetes quantities.
pub const SHARE_MEMORY_GRANULE: u64 = MIB;

/// A size of dedicated node the platform sells.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeClass {
    pub name: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl NodeClass {
    /// The classes the platform sells unless configured otherwise: S, M and L.
    pub fn defaults() -> Vec<NodeClass> {
        let class = |name: &str, cpus: u64, mem_gib: u64, disk_gib: u64| NodeClass {
            name: name.to_string(),
            cpu_millis: cpus * 1000,
            memory_bytes: mem_gib * GIB,
            disk_bytes: disk_gib * GIB,
        };
        vec![class("S", 4, 16, 200), class("M", 8, 32, 500), class("L", 16, 64, 1000)]
    }
}

/// Checks a configured list of node classes: at least one, unique non-empty names, no zero sizes.
pub fn validate_node_classes(classes: &[NodeClass]) -> Result<(), TenantError> {
    if classes.is_empty() {
        return Err(TenantError::NodeClasses("no node classes are configured: configure at least one".into()));
    }
    for (i, class) in classes.iter().enumerate() {
        if class.name.is_empty() || class.name.len() > 32 || !class.name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(TenantError::NodeClasses(format!(
                "node class name {:?} is invalid: use 1 to 32 letters or digits",
                class.name
            )));
        }
        if classes[..i].iter().any(|c| c.name == class.name) {
            return Err(TenantError::NodeClasses(format!(
                "node class {} is configured twice: give each class its own name",
                class.name
            )));
        }
        if class.cpu_millis == 0 || class.memory_bytes == 0 || class.disk_bytes == 0 {
            return Err(TenantError::NodeClasses(format!(
                "node class {} has a zero size: set cpu_millis, memory_bytes and disk_bytes",
                class.name
            )));
        }
    }
    Ok(())
}

/// What a tenant buys.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Plan {
    /// A quota on the shared pool, split into `spread` equal shares on distinct nodes.
    Shared(SharedPlan),
    /// Whole nodes of one class, used by this tenant alone.
    Dedicated(DedicatedPlan),
}

impl Plan {
    pub fn kind(&self) -> &'static str {
        match self {
            Plan::Shared(_) => "shared",
            Plan::Dedicated(_) => "dedicated",
        }
    }

    /// Checks the plan against the configured node classes.
    pub fn validate(&self, classes: &[NodeClass]) -> Result<(), TenantError> {
        match self {
            Plan::Shared(plan) => plan.validate(),
            Plan::Dedicated(plan) => plan.validate(classes).map(|_| ()),
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SharedPlan {
    /// Total CPU quota of the tenant, in millicores.
    #[cfg_attr(feature = "openapi", schema(minimum = 100))] // MIN_SHARE_CPU_MILLIS
    pub cpu_millis: u64,
    /// Total memory quota, in bytes.
    #[cfg_attr(feature = "openapi", schema(minimum = 134217728))] // MIN_SHARE_MEMORY_BYTES
    pub memory_bytes: u64,
    /// Most pods the tenant may run.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub pods: u32,
    /// Control-plane replicas: 1, or 3 for a highly available control plane. Each replica runs on
    /// its own share node, inside the tenant's quota.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::replicas_schema))]
    pub replicas: u8,
    /// Number of nodes the quota is split over; at least `replicas`.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))] // MAX_SPREAD
    pub spread: u32,
}

/// What one share of a shared plan reserves on its node.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ShareSize {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u32,
}

impl fmt::Display for ShareSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CPU, {} memory and {} pods",
            format_cpu_millis(self.cpu_millis),
            format_bytes(self.memory_bytes),
            self.pods
        )
    }
}

impl SharedPlan {
    pub fn validate(&self) -> Result<(), TenantError> {
        if self.cpu_millis == 0 {
            return Err(TenantError::EmptyQuota { field: "cpu_millis" });
        }
        if self.memory_bytes == 0 {
            return Err(TenantError::EmptyQuota { field: "memory_bytes" });
        }
        if self.pods == 0 {
            return Err(TenantError::EmptyQuota { field: "pods" });
        }
        if self.replicas != 1 && self.replicas != 3 {
            return Err(TenantError::Replicas { replicas: self.replicas });
        }
        if self.spread == 0 {
            return Err(TenantError::SpreadZero);
        }
        if self.spread < u32::from(self.replicas) {
            return Err(TenantError::SpreadBelowReplicas { spread: self.spread, replicas: self.replicas });
        }
        if self.spread > MAX_SPREAD {
            return Err(TenantError::SpreadTooLarge {
                spread: self.spread,
                why: format!(
                    "the most nodes a tenant may be spread over is {MAX_SPREAD}; use spread {MAX_SPREAD} or less"
                ),
            });
        }
        let spread = u64::from(self.spread);
        if self.cpu_millis / spread < MIN_SHARE_CPU_MILLIS {
            let most = (self.cpu_millis / MIN_SHARE_CPU_MILLIS).max(1);
            return Err(TenantError::SpreadTooLarge {
                spread: self.spread,
                why: format!(
                    "each share needs at least {} CPU and {} CPU split {} ways is {}; use spread {most} or less, or raise cpu_millis",
                    format_cpu_millis(MIN_SHARE_CPU_MILLIS),
                    format_cpu_millis(self.cpu_millis),
                    self.spread,
                    format_cpu_millis(self.cpu_millis / spread),
                ),
            });
        }
        if self.memory_bytes / spread < MIN_SHARE_MEMORY_BYTES {
            let most = (self.memory_bytes / MIN_SHARE_MEMORY_BYTES).max(1);
            return Err(TenantError::SpreadTooLarge {
                spread: self.spread,
                why: format!(
                    "each share needs at least {} memory and {} split {} ways is {}; use spread {most} or less, or raise memory_bytes",
                    format_bytes(MIN_SHARE_MEMORY_BYTES),
                    format_bytes(self.memory_bytes),
                    self.spread,
                    format_bytes(self.memory_bytes / spread),
                ),
            });
        }
        if self.pods < self.spread {
            return Err(TenantError::SpreadTooLarge {
                spread: self.spread,
                why: format!(
                    "each share needs at least one pod and the quota has {} pods; use spread {} or less, or raise pods",
                    self.pods, self.pods
                ),
            });
        }
        Ok(())
    }

    /// The size of each share: the quota divided by `spread`, rounded up (CPU to the millicore,
    /// memory to the MiB, pods to the pod), so the shares together never hold less than the quota
    /// and exceed it by less than one unit per share.
    pub fn share_size(&self) -> ShareSize {
        let spread = u64::from(self.spread.max(1));
        let memory = self.memory_bytes.div_ceil(spread);
        ShareSize {
            cpu_millis: self.cpu_millis.div_ceil(spread),
            memory_bytes: memory.div_ceil(SHARE_MEMORY_GRANULE).saturating_mul(SHARE_MEMORY_GRANULE),
            pods: self.pods.div_ceil(self.spread.max(1)),
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DedicatedPlan {
    /// Name of a configured [`NodeClass`].
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9]{1,32}$"))]
    pub node_class: String,
    /// Number of nodes.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))] // MAX_DEDICATED_NODES
    pub count: u32,
}

impl DedicatedPlan {
    /// Checks the plan and returns its node class.
    pub fn validate<'a>(&self, classes: &'a [NodeClass]) -> Result<&'a NodeClass, TenantError> {
        let class = classes.iter().find(|c| c.name == self.node_class).ok_or_else(|| {
            TenantError::UnknownNodeClass { class: self.node_class.clone(), known: known_classes(classes) }
        })?;
        if self.count == 0 {
            return Err(TenantError::DedicatedCount {
                count: 0,
                why: "a dedicated tenant needs at least one node; use count 1 or more".into(),
            });
        }
        if self.count > MAX_DEDICATED_NODES {
            return Err(TenantError::DedicatedCount {
                count: self.count,
                why: format!("the most dedicated nodes a tenant may have is {MAX_DEDICATED_NODES}"),
            });
        }
        Ok(class)
    }
}

fn known_classes(classes: &[NodeClass]) -> String {
    let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
    match names.as_slice() {
        [] => "none (configure node classes first)".to_string(),
        [only] => (*only).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Where a tenant is in its life.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Phase {
    /// Accepted and persisted, not yet placed.
    #[default]
    Pending,
    /// Waiting for dedicated nodes to be provisioned and to register.
    Provisioning,
    /// Placed; the vCluster is being installed or moved.
    Deploying,
    /// The vCluster is installed and its control plane is ready.
    Ready,
    /// Running with less than its plan: a share or dedicated node was lost and not yet replaced.
    Degraded,
    /// Being removed; nothing of it is left once this completes.
    Deleting,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The aspects of a tenant that conditions report on.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConditionType {
    /// Every share (or dedicated node) of the plan has a node.
    Placed,
    /// The vCluster objects are applied on the host cluster.
    Deployed,
    /// The vCluster control plane answers.
    Ready,
}

/// One observation about a tenant, in the manner of Kubernetes conditions: `reason` is a short
/// CamelCase word a program can match on (see [`reasons`]), `message` is for a person.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: bool,
    pub reason: String,
    pub message: String,
    /// When `status` last changed, in Unix milliseconds (supplied by the caller: the model knows no clock).
    pub last_transition_unix_ms: u64,
}

/// Reasons used in [`Condition::reason`].
pub mod reasons {
    pub const PLACED: &str = "Placed";
    pub const AWAITING_NODES: &str = "AwaitingNodes";
    pub const NODE_LOST: &str = "NodeLost";
    pub const DEPLOYING: &str = "Deploying";
    pub const DEPLOYED: &str = "Deployed";
    pub const DEPLOY_FAILED: &str = "DeployFailed";
    /// Placed, but the coordinator has no access to the host cluster yet (see the message).
    pub const WAITING_FOR_HOST_CLUSTER: &str = "WaitingForHostCluster";
    pub const READY: &str = "Ready";
    pub const DELETING: &str = "Deleting";
}

/// One share of a shared plan and the node that holds it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Share {
    /// 0-based; shares `0..replicas` carry a control-plane replica.
    pub index: u32,
    pub node: String,
    pub size: ShareSize,
    /// True when a control-plane replica runs on this share's node.
    pub control_plane: bool,
}

/// Where a tenant lives. A tenant moving between plans can briefly have both shares and dedicated
/// nodes: the shares keep serving until every dedicated node is bound.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Shares on shared nodes, sorted by index, each on a different node.
    pub shares: Vec<Share>,
    /// Dedicated nodes bound to this tenant alone, sorted by name.
    pub dedicated_nodes: Vec<String>,
    /// Dedicated nodes asked of the provisioner and not yet registered.
    pub awaiting_nodes: u32,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self.shares.is_empty() && self.dedicated_nodes.is_empty() && self.awaiting_nodes == 0
    }

    /// Every node this tenant uses (share or dedicated), sorted and without duplicates.
    pub fn nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.shares.iter().map(|s| s.node.as_str()).collect();
        nodes.extend(self.dedicated_nodes.iter().map(String::as_str));
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// The share held on `node`, if any.
    pub fn share_on(&self, node: &str) -> Option<&Share> {
        self.shares.iter().find(|s| s.node == node)
    }
}

/// A tenant as the coordinator stores it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"))]
    pub name: String,
    pub plan: Plan,
    pub phase: Phase,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub placement: Placement,
}

impl Tenant {
    /// A new tenant, validated, in phase `Pending` with no placement.
    pub fn new(name: &str, plan: Plan, classes: &[NodeClass]) -> Result<Tenant, TenantError> {
        validate_tenant(name, &plan, classes)?;
        Ok(Tenant {
            name: name.to_string(),
            plan,
            phase: Phase::Pending,
            conditions: Vec::new(),
            placement: Placement::default(),
        })
    }

    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Sets a condition. `last_transition_unix_ms` only moves when the status flips. Returns true
    /// when anything changed.
    pub fn set_condition(
        &mut self,
        kind: ConditionType,
        status: bool,
        reason: &str,
        message: &str,
        now_unix_ms: u64,
    ) -> bool {
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(existing) => {
                if existing.status == status && existing.reason == reason && existing.message == message {
                    return false;
                }
                if existing.status != status {
                    existing.last_transition_unix_ms = now_unix_ms;
                }
                existing.status = status;
                existing.reason = reason.to_string();
                existing.message = message.to_string();
                true
            }
            None => {
                self.conditions.push(Condition {
                    kind,
                    status,
                    reason: reason.to_string(),
                    message: message.to_string(),
                    last_transition_unix_ms: now_unix_ms,
                });
                self.conditions.sort_by_key(|c| c.kind);
                true
            }
        }
    }
}

/// Checks a tenant's name and plan, as every entry point (API, CLI, config) must before accepting it.
pub fn validate_tenant(name: &str, plan: &Plan, classes: &[NodeClass]) -> Result<(), TenantError> {
    validate_tenant_name(name)?;
    plan.validate(classes)
}

/// Why a tenant or its plan is refused. Every message says which value is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{field} is 0: a shared plan needs some of every resource; set {field} above 0")]
    EmptyQuota { field: &'static str },
    #[error("replicas {replicas} is not supported: use 1 (single control plane) or 3 (highly available)")]
    Replicas { replicas: u8 },
    #[error("spread 0 is not allowed: the quota must sit on at least one node; use spread 1 or more")]
    SpreadZero,
    #[error(
        "spread {spread} is smaller than replicas {replicas}: each control-plane replica runs on its own share node, so set spread to at least {replicas}"
    )]
    SpreadBelowReplicas { spread: u32, replicas: u8 },
    #[error("spread {spread} is larger than this quota allows: {why}")]
    SpreadTooLarge { spread: u32, why: String },
    #[error("unknown node class {class}: known classes are {known}")]
    UnknownNodeClass { class: String, known: String },
    #[error("dedicated count {count} is not allowed: {why}")]
    DedicatedCount { count: u32, why: String },
    #[error("{0}")]
    NodeClasses(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(cpu_millis: u64, memory_bytes: u64, pods: u32, replicas: u8, spread: u32) -> Plan {
        Plan::Shared(SharedPlan { cpu_millis, memory_bytes, pods, replicas, spread })
    }

    fn dedicated(class: &str, count: u32) -> Plan {
        Plan::Dedicated(DedicatedPlan { node_class: class.into(), count })
    }

    #[test]
    fn default_node_classes_are_what_the_platform_sells() {
        let classes = NodeClass::defaults();
        let sizes: Vec<(&str, u64, u64, u64)> =
            classes.iter().map(|c| (c.name.as_str(), c.cpu_millis, c.memory_bytes >> 30, c.disk_bytes >> 30)).collect();
        assert_eq!(sizes, vec![("S", 4000, 16, 200), ("M", 8000, 32, 500), ("L", 16000, 64, 1000)]);
        assert_eq!(validate_node_classes(&classes), Ok(()));
    }

    #[test]
    fn invalid_plans_are_refused_with_a_message_that_says_what_to_change() {
        let classes = NodeClass::defaults();
        let table: &[(&str, Plan, &str)] = &[
            ("acme", shared(0, GIB, 10, 1, 1), "cpu_millis is 0"),
            ("acme", shared(1000, 0, 10, 1, 1), "set memory_bytes above 0"),
            ("acme", shared(1000, GIB, 0, 1, 1), "pods is 0"),
            ("acme", shared(1000, GIB, 10, 2, 2), "replicas 2 is not supported: use 1 (single control plane) or 3"),
            ("acme", shared(1000, GIB, 10, 1, 0), "spread 0 is not allowed"),
            ("acme", shared(4000, 8 * GIB, 30, 3, 1), "spread 1 is smaller than replicas 3"),
            (
                "acme",
                shared(300, 8 * GIB, 30, 1, 5),
                "spread 5 is larger than this quota allows: each share needs at least 100m CPU and 300m CPU split 5 ways is 60m; use spread 3 or less",
            ),
            ("acme", shared(8000, 512 * MIB, 30, 1, 5), "512.0 MiB split 5 ways is 102.4 MiB; use spread 4 or less"),
            (
                "acme",
                shared(8000, 8 * GIB, 3, 1, 5),
                "each share needs at least one pod and the quota has 3 pods; use spread 3 or less",
            ),
            ("acme", shared(64_000, 64 * GIB, 1000, 3, 65), "the most nodes a tenant may be spread over is 64"),
            ("acme", dedicated("XL", 1), "unknown node class XL: known classes are S, M and L"),
            ("acme", dedicated("M", 0), "dedicated count 0 is not allowed: a dedicated tenant needs at least one node"),
            ("acme", dedicated("M", 65), "the most dedicated nodes a tenant may have is 64"),
            ("Acme", dedicated("M", 1), "tenant name \"Acme\" is invalid"),
            (&"a".repeat(41), dedicated("M", 1), "longer than 40 characters"),
        ];
        for (name, plan, expected) in table {
            let err = validate_tenant(name, plan, &classes).expect_err(expected).to_string();
            assert!(err.contains(expected), "{name} {plan:?}: got {err:?}, expected it to contain {expected:?}");
        }
        assert_eq!(validate_tenant("acme", &shared(2000, 4 * GIB, 40, 3, 3), &classes), Ok(()));
        assert_eq!(validate_tenant("acme", &dedicated("L", 2), &classes), Ok(()));
    }

    #[test]
    fn node_class_lists_are_checked() {
        let mut classes = NodeClass::defaults();
        assert!(validate_node_classes(&[]).is_err());
        classes.push(classes[0].clone());
        assert!(validate_node_classes(&classes).unwrap_err().to_string().contains("node class S is configured twice"));
        let zero = NodeClass { name: "Z".into(), cpu_millis: 0, memory_bytes: 1, disk_bytes: 1 };
        assert!(validate_node_classes(&[zero]).unwrap_err().to_string().contains("node class Z has a zero size"));
    }

    #[test]
    fn shares_cover_the_quota_and_round_up() {
        let table: &[(SharedPlan, ShareSize)] = &[
            (
                SharedPlan { cpu_millis: 1000, memory_bytes: 3 * GIB, pods: 10, replicas: 3, spread: 3 },
                ShareSize { cpu_millis: 334, memory_bytes: GIB, pods: 4 },
            ),
            (
                SharedPlan { cpu_millis: 500, memory_bytes: GIB + 1, pods: 7, replicas: 1, spread: 1 },
                ShareSize { cpu_millis: 500, memory_bytes: GIB + MIB, pods: 7 },
            ),
            (
                SharedPlan { cpu_millis: 4000, memory_bytes: 5 * GIB, pods: 30, replicas: 1, spread: 2 },
                ShareSize { cpu_millis: 2000, memory_bytes: 2560 * MIB, pods: 15 },
            ),
        ];
        for (plan, expected) in table {
            let share = plan.share_size();
            assert_eq!(share, *expected, "{plan:?}");
            let spread = u64::from(plan.spread);
            assert!(
                share.cpu_millis * spread >= plan.cpu_millis && share.cpu_millis * spread < plan.cpu_millis + spread
            );
            assert!(share.memory_bytes * spread >= plan.memory_bytes);
            assert!(share.memory_bytes * spread < plan.memory_bytes + spread * MIB);
        }
    }

    #[test]
    fn conditions_keep_their_transition_time_until_the_status_flips() {
        let mut tenant = Tenant::new("acme", dedicated("M", 1), &NodeClass::defaults()).unwrap();
        assert_eq!(tenant.phase, Phase::Pending);
        assert!(tenant.set_condition(ConditionType::Placed, false, reasons::AWAITING_NODES, "1 node requested", 10));
        assert!(!tenant.set_condition(ConditionType::Placed, false, reasons::AWAITING_NODES, "1 node requested", 20));
        assert!(tenant.set_condition(ConditionType::Placed, false, reasons::AWAITING_NODES, "still waiting", 30));
        assert_eq!(tenant.condition(ConditionType::Placed).map(|c| c.last_transition_unix_ms), Some(10));
        assert!(tenant.set_condition(ConditionType::Placed, true, reasons::PLACED, "bound", 40));
        assert_eq!(tenant.condition(ConditionType::Placed).map(|c| c.last_transition_unix_ms), Some(40));
        assert!(tenant.set_condition(ConditionType::Deployed, false, reasons::DEPLOYING, "", 50));
        let kinds: Vec<ConditionType> = tenant.conditions.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, vec![ConditionType::Placed, ConditionType::Deployed]);
    }

    #[test]
    fn tenants_round_trip_through_json() {
        let mut tenant = Tenant::new("acme", shared(2000, 4 * GIB, 40, 3, 3), &NodeClass::defaults()).unwrap();
        tenant.placement.shares.push(Share {
            index: 0,
            node: "n1".into(),
            size: ShareSize { cpu_millis: 667, memory_bytes: 1366 * MIB, pods: 14 },
            control_plane: true,
        });
        tenant.placement.dedicated_nodes.push("d1".into());
        tenant.placement.awaiting_nodes = 2;
        tenant.set_condition(ConditionType::Placed, true, reasons::PLACED, "placed", 1);
        let json = serde_json::to_string(&tenant).unwrap();
        assert!(json.contains(r#""plan":{"kind":"shared","cpu_millis":2000"#), "{json}");
        let back: Tenant = serde_json::from_str(&json).unwrap();
        assert_eq!(back, tenant);
        let plan: Plan = serde_json::from_str(r#"{"kind":"dedicated","node_class":"L","count":2}"#).unwrap();
        assert_eq!(plan, dedicated("L", 2));
        assert!(serde_json::from_str::<Plan>(r#"{"kind":"dedicated","node_class":"L","count":2,"gpu":1}"#).is_err());
    }
}
