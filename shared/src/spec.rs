//! Desired state: what the coordinator wants a node to be. Each change gets a higher generation;
//! the agent applies a spec idempotently, keeps the last one on disk and reports the generation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::k3s::K3sSpec;
use crate::names::Pool;

/// Label every node carries with its pool.
pub const POOL_LABEL: &str = "hexabase.ai/pool";
/// Taint key that keeps everyone but the owning tenant off a dedicated node.
pub const DEDICATED_TAINT: &str = "hexabase.ai/dedicated";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Strictly increasing per node; 0 is never sent.
    pub generation: u64,
    pub node_name: String,
    pub pool: Pool,
    /// Kubernetes node labels the node must carry.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Tenants with a share on this node and what the node must give each, sorted by tenant.
    pub tenants: Vec<TenantAllocation>,
    /// K3s on this node; `None` when the coordinator does not manage K3s here.
    pub k3s: Option<K3sSpec>,
    /// Tenant isolation this node enforces (firewall); `None` leaves the node's firewall alone.
    pub isolation: Option<crate::isolation::IsolationSpec>,
}

/// One tenant's allocation on one node: the most its pods together may use here. The coordinator
/// decides all of it (`desired::AllocationPlan` there) and the node's cgroup governor enforces it as
/// it is, deriving nothing: each of the tenant's pod cgroups gets `cpu.max`, `memory.max` and
/// `pids.max` from these values.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TenantAllocation {
    pub tenant: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u32,
    /// Most processes and threads the tenant's pods may run together on this node (each pod's
    /// `pids.max`). The coordinator always sets it; `None` only in a spec written before specs
    /// carried it (a node's saved `spec.json`), and the governor then leaves `pids.max` as it is.
    #[serde(default)]
    pub pids: Option<u64>,
    /// This node runs one of the tenant's vCluster control-plane replicas.
    pub control_plane: bool,
}

pub use crate::names::tenant_label;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}:{:?}", self.key, self.value, self.effect)
    }
}

impl NodeSpec {
    /// The labels and taints a node of `pool` carries before any tenant is placed on it.
    pub fn for_pool(node_name: &str, pool: &Pool, generation: u64) -> NodeSpec {
        Self::build(node_name, pool, generation, Vec::new())
    }

    /// The desired state of a node of `pool` holding `tenants`: pool label and taint, and a
    /// `tenant.hexabase.ai/<tenant>=true` label per tenant with a share here.
    pub fn build(node_name: &str, pool: &Pool, generation: u64, mut tenants: Vec<TenantAllocation>) -> NodeSpec {
        let mut labels = BTreeMap::new();
        let pool_kind = match pool {
            Pool::Server => "server",
            Pool::Shared => "shared",
            Pool::Dedicated { .. } => "dedicated",
        };
        labels.insert(POOL_LABEL.to_string(), pool_kind.to_string());
        let mut taints = Vec::new();
        tenants.sort();
        for allocation in &tenants {
            labels.insert(tenant_label(&allocation.tenant), "true".to_string());
        }
        if let Pool::Dedicated { tenant } = pool {
            labels.insert(tenant_label(tenant), "true".to_string());
            taints.push(Taint {
                key: DEDICATED_TAINT.to_string(),
                value: tenant.clone(),
                effect: TaintEffect::NoSchedule,
            });
        }
        NodeSpec {
            generation,
            node_name: node_name.to_string(),
            pool: pool.clone(),
            labels,
            taints,
            tenants,
            k3s: None,
            isolation: None,
        }
    }

    /// The same spec with K3s managed as `k3s` says.
    pub fn with_k3s(self, k3s: Option<K3sSpec>) -> NodeSpec {
        NodeSpec { k3s, ..self }
    }

    /// True when `other` asks for the same state, whatever its generation.
    pub fn same_content(&self, other: &NodeSpec) -> bool {
        NodeSpec { generation: other.generation, ..self.clone() } == *other
    }
}

/// The agent's answer to a spec.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppliedStatus {
    pub generation: u64,
    pub outcome: ApplyOutcome,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    Failed { reason: String },
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    pub fn node_spec() -> impl Strategy<Value = NodeSpec> {
        let allocation =
            (
                "[a-z][a-z0-9]{0,8}",
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                proptest::option::of(any::<u64>()),
                any::<bool>(),
            )
                .prop_map(|(tenant, cpu_millis, memory_bytes, pods, pids, control_plane)| {
                    TenantAllocation { tenant, cpu_millis, memory_bytes, pods, pids, control_plane }
                });
        (1u64.., "[a-z0-9-]{1,20}", crate::names::strategies::pool(), proptest::collection::vec(allocation, 0..4))
            .prop_map(|(generation, name, pool, tenants)| NodeSpec::build(&name, &pool, generation, tenants))
    }

    pub fn applied_status() -> impl Strategy<Value = AppliedStatus> {
        (any::<u64>(), proptest::option::of(".*")).prop_map(|(generation, failure)| AppliedStatus {
            generation,
            outcome: match failure {
                None => ApplyOutcome::Applied,
                Some(reason) => ApplyOutcome::Failed { reason },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedicated_nodes_carry_their_tenant_label_and_taint() {
        let spec = NodeSpec::for_pool("n1", &Pool::Dedicated { tenant: "acme".into() }, 3);
        assert_eq!(spec.labels.get(POOL_LABEL).map(String::as_str), Some("dedicated"));
        assert_eq!(spec.labels.get("tenant.hexabase.ai/acme").map(String::as_str), Some("true"));
        assert_eq!(spec.taints[0].to_string(), "hexabase.ai/dedicated=acme:NoSchedule");
        let shared = NodeSpec::for_pool("n1", &Pool::Shared, 1);
        assert!(shared.taints.is_empty());
        let hosting = NodeSpec::build(
            "n1",
            &Pool::Shared,
            1,
            vec![TenantAllocation {
                tenant: "b".into(),
                cpu_millis: 1,
                memory_bytes: 1,
                pods: 1,
                pids: Some(1024),
                control_plane: false,
            }],
        );
        assert_eq!(hosting.labels.get("tenant.hexabase.ai/b").map(String::as_str), Some("true"));
        assert!(spec.same_content(&NodeSpec { generation: 9, ..spec.clone() }));
        assert!(!spec.same_content(&shared));
    }

    /// A node's saved `spec.json` from before allocations carried pids (and when the isolation
    /// spec carried a second allocation per tenant) still loads: no pids cap, the rest as it was.
    #[test]
    fn a_spec_saved_before_allocations_carried_pids_still_loads() {
        let saved = r#"{"generation":4,"node_name":"n1","pool":"shared","labels":{},"taints":[],
            "tenants":[{"tenant":"acme","cpu_millis":500,"memory_bytes":268435456,"pods":4,"control_plane":true}],
            "k3s":null,
            "isolation":{"pod_cidr":"10.42.0.0/16","management_cidrs":[],"system_pod_ips":[],
              "tenants":[{"tenant":"acme","allocation":{"cpu_millis":500,"memory_bytes":268435456,"pids":4096},
                          "pod_ips":["10.42.0.9"]}]}}"#;
        let spec: NodeSpec = serde_json::from_str(saved).unwrap();
        let allocation = &spec.tenants[0];
        assert_eq!((allocation.cpu_millis, allocation.pods, allocation.pids), (500, 4, None));
        assert!(allocation.control_plane);
        let isolation = spec.isolation.unwrap();
        assert_eq!(isolation.tenant("acme").map(|t| t.pod_ips.len()), Some(1));
    }
}
