//! The vCluster chart values (vcluster chart 0.36.1, `values.schema.json`; field names are the
//! schema's keys) of a tenant.
//!
//! How the plan becomes values:
//! - **Control plane pinned** to the tenant's nodes: `controlPlane.statefulSet.scheduling.nodeSelector`
//!   is the tenant label; a dedicated tenant's control plane also tolerates its dedicated taint.
//!   Three replicas (`controlPlane.statefulSet.highAvailability.replicas`) run on three different
//!   nodes (required pod anti-affinity on `kubernetes.io/hostname`) and store their state in an etcd
//!   the chart deploys (`controlPlane.backingStore.etcd.deploy`), pinned the same way: vCluster
//!   refuses its default SQLite store with more than one replica.
//! - **Workloads pinned**: `sync.fromHost.nodes.selector.labels` is the tenant label, which also
//!   becomes the node selector of every pod the vCluster syncs to the host; `selector.all` stays
//!   false because `all: true` syncs every node and ignores the labels. A dedicated tenant's pods get
//!   the dedicated toleration through `sync.toHost.pods.enforceTolerations`.
//! - **Quota** (`policies.resourceQuota`) is the plan: the shared plan's CPU, memory and pods, or the
//!   node class times the node count. It caps requests; limits are left to the node agent's cgroup
//!   governor, which lets a tenant's pods burst within its share, so the chart's default
//!   `limits.cpu`/`limits.memory` quota entries are removed (set to null, Helm's way of deleting a
//!   default). The control plane and its etcd run in the same namespace and count against the quota;
//!   together they request at most half of it.
//! - `policies.limitRange` gives containers without resources a request and a limit no larger than
//!   one share (or one dedicated node); `policies.networkPolicy` isolates the tenant's pods;
//!   `policies.podSecurityStandard` enforces the configured Pod Security Standard inside the vCluster.

use std::collections::BTreeMap;

use serde::Serialize;

use hexa_shared::names::tenant_label;
use hexa_shared::quantity::format_cpu_millis;
use hexa_shared::spec::TaintEffect;
use hexa_shared::tenant::{NodeClass, Plan, Tenant};

use super::{
    COMPONENT_LABEL, ComponentResources, GIB, HOSTNAME_TOPOLOGY_KEY, HaBackingStore, MIB, PodSecurityLevel,
    RenderError, RenderSettings, TENANT_LABEL, dedicated_taint,
};

/// The values document; top-level keys of the schema's root object.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VclusterValues {
    /// `#/$defs/ControlPlane`
    pub control_plane: ControlPlane,
    /// `#/$defs/Sync`
    pub sync: SyncConfig,
    /// `#/$defs/Policies`
    pub policies: Policies,
}

/// `#/$defs/ControlPlane`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlane {
    /// `#/$defs/BackingStore`; only for three replicas (one replica keeps the chart's SQLite).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_store: Option<BackingStore>,
    /// `#/$defs/ControlPlaneStatefulSet`
    pub stateful_set: ControlPlaneStatefulSet,
}

/// `#/$defs/ControlPlaneStatefulSet` (also the shape used here for `#/$defs/EtcdDeployStatefulSet`).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneStatefulSet {
    /// `#/$defs/ControlPlaneHighAvailability` / `#/$defs/ExternalEtcdHighAvailability`
    pub high_availability: HighAvailability,
    /// `#/$defs/Resources`
    pub resources: Resources,
    /// `#/$defs/ControlPlaneScheduling`
    pub scheduling: Scheduling,
    /// `#/$defs/LabelsAndAnnotations`
    pub pods: PodMetadata,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct HighAvailability {
    pub replicas: u32,
}

/// `#/$defs/Resources`: Kubernetes quantities by resource name.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub requests: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
}

/// `#/$defs/ControlPlaneScheduling`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// A Kubernetes `Toleration`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    pub operator: &'static str,
    pub value: String,
    pub effect: TaintEffect,
}

/// A Kubernetes `Affinity` with only required pod anti-affinity.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Affinity {
    pub pod_anti_affinity: PodAntiAffinity,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodAntiAffinity {
    pub required_during_scheduling_ignored_during_execution: Vec<PodAffinityTerm>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodAffinityTerm {
    pub label_selector: LabelSelector,
    pub topology_key: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
}

/// `#/$defs/LabelsAndAnnotations` (labels only).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct PodMetadata {
    pub labels: BTreeMap<String, String>,
}

/// `#/$defs/BackingStore`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct BackingStore {
    /// `#/$defs/Etcd`
    pub etcd: Etcd,
}

/// `#/$defs/Etcd`: exactly one of the two is set.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Etcd {
    /// `#/$defs/EtcdEmbedded`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded: Option<Enabled>,
    /// `#/$defs/EtcdDeploy`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<EtcdDeploy>,
}

/// `#/$defs/EtcdDeploy`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EtcdDeploy {
    pub enabled: bool,
    /// `#/$defs/EtcdDeployStatefulSet`
    pub stateful_set: ControlPlaneStatefulSet,
}

/// Any `{ enabled: <bool> }` switch.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled {
    pub enabled: bool,
}

/// `#/$defs/Sync`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SyncConfig {
    /// `#/$defs/SyncFromHost`
    pub from_host: SyncFromHost,
    /// `#/$defs/SyncToHost`
    pub to_host: SyncToHost,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SyncFromHost {
    /// `#/$defs/SyncNodes`
    pub nodes: SyncNodes,
}

/// `#/$defs/SyncNodes`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SyncNodes {
    pub enabled: bool,
    /// Hides the images other tenants pulled on a shared node.
    pub clear_image_status: bool,
    /// `#/$defs/SyncNodeSelector`
    pub selector: SyncNodeSelector,
}

/// `#/$defs/SyncNodeSelector`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SyncNodeSelector {
    /// Must stay false: `all: true` syncs every node and ignores `labels`.
    pub all: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SyncToHost {
    /// `#/$defs/SyncPods`
    pub pods: SyncPods,
}

/// `#/$defs/SyncPods`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SyncPods {
    /// Tolerations as `key=value:Effect`, added to every pod synced to the host.
    pub enforce_tolerations: Vec<String>,
}

/// `#/$defs/Policies`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Policies {
    /// `baseline`, `restricted` or `privileged`.
    pub pod_security_standard: PodSecurityLevel,
    /// `#/$defs/ResourceQuota`
    pub resource_quota: ResourceQuota,
    /// `#/$defs/LimitRange`
    pub limit_range: LimitRange,
    /// `#/$defs/NetworkPolicy`
    pub network_policy: Enabled,
}

/// `#/$defs/ResourceQuota`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ResourceQuota {
    pub enabled: bool,
    /// Resource name to quantity; `None` (null) deletes the chart's default entry.
    pub quota: BTreeMap<String, Option<String>>,
}

/// `#/$defs/LimitRange`
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LimitRange {
    pub enabled: bool,
    /// Default limits.
    pub default: BTreeMap<String, String>,
    /// Default requests.
    pub default_request: BTreeMap<String, String>,
}

/// What the plan gives the tenant, resolved against the node classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sizing {
    total_cpu_millis: u64,
    total_memory_bytes: u64,
    total_pods: u64,
    /// What the tenant has on one node: a share, or a whole dedicated node.
    node_cpu_millis: u64,
    node_memory_bytes: u64,
    replicas: u32,
    dedicated: bool,
}

fn sizing(tenant: &Tenant, classes: &[NodeClass], settings: &RenderSettings) -> Result<Sizing, RenderError> {
    let plan_error = |source| RenderError::Plan { tenant: tenant.name.clone(), source };
    match &tenant.plan {
        Plan::Shared(plan) => {
            plan.validate().map_err(plan_error)?;
            let share = plan.share_size();
            Ok(Sizing {
                total_cpu_millis: plan.cpu_millis,
                total_memory_bytes: plan.memory_bytes,
                total_pods: u64::from(plan.pods),
                node_cpu_millis: share.cpu_millis,
                node_memory_bytes: share.memory_bytes,
                replicas: u32::from(plan.replicas),
                dedicated: false,
            })
        }
        Plan::Dedicated(plan) => {
            let class = plan.validate(classes).map_err(plan_error)?;
            let count = u64::from(plan.count);
            Ok(Sizing {
                total_cpu_millis: class.cpu_millis.saturating_mul(count),
                total_memory_bytes: class.memory_bytes.saturating_mul(count),
                total_pods: u64::from(settings.dedicated_pods_per_node).saturating_mul(count),
                node_cpu_millis: class.cpu_millis,
                node_memory_bytes: class.memory_bytes,
                replicas: 1,
                dedicated: true,
            })
        }
    }
}

/// Memory as a Kubernetes quantity: `16Gi`, `256Mi`, `64Ki`, or bytes.
fn memory_quantity(bytes: u64) -> String {
    match bytes {
        0 => "0".to_string(),
        b if b % GIB == 0 => format!("{}Gi", b / GIB),
        b if b % MIB == 0 => format!("{}Mi", b / MIB),
        b if b % 1024 == 0 => format!("{}Ki", b / 1024),
        b => b.to_string(),
    }
}

fn cpu_quantity(millis: u64) -> String {
    format_cpu_millis(millis)
}

fn pod_labels(tenant: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TENANT_LABEL.to_string(), tenant.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ])
}

/// The control plane's (and its etcd's) requests are capped so that together they take at most
/// half of the plan's quota: the rest is the tenant's.
const SYSTEM_SHARE_DIVISOR: u64 = 2;

fn round_down_mib(bytes: u64) -> u64 {
    (bytes / MIB * MIB).max(MIB)
}

/// The vCluster values for the tenant (see the module documentation for what each part does).
///
/// Control plane sizing, per replica: the configured requests, capped so that all replicas with
/// their etcd request at most half the quota (the etcd getting a quarter of that); the memory limit
/// is the configured one capped at one share (or one dedicated node) and never below the request.
pub fn vcluster_values(
    tenant: &Tenant,
    classes: &[NodeClass],
    settings: &RenderSettings,
) -> Result<VclusterValues, RenderError> {
    let size = sizing(tenant, classes, settings)?;
    let name = tenant.name.as_str();
    let selector = BTreeMap::from([(tenant_label(name), "true".to_string())]);
    let taint = dedicated_taint(name);
    let tolerations = if size.dedicated {
        vec![Toleration { key: taint.key.clone(), operator: "Equal", value: taint.value.clone(), effect: taint.effect }]
    } else {
        Vec::new()
    };
    let ha = size.replicas > 1;

    // Requests budget of one replica (control plane plus, with three replicas, its etcd).
    let replicas = u64::from(size.replicas.max(1));
    let cpu_budget = size.total_cpu_millis / (SYSTEM_SHARE_DIVISOR * replicas);
    let memory_budget = size.total_memory_bytes / (SYSTEM_SHARE_DIVISOR * replicas);
    let (etcd_cpu_budget, etcd_memory_budget) = if ha { (cpu_budget / 4, memory_budget / 4) } else { (0, 0) };
    let component = |wanted: &ComponentResources, cpu_cap: u64, memory_cap: u64| {
        let cpu = wanted.cpu_request_millis.min(cpu_cap).max(1);
        let memory = round_down_mib(wanted.memory_request_bytes.min(memory_cap));
        let limit = wanted.memory_limit_bytes.min(size.node_memory_bytes).max(memory);
        Resources {
            requests: BTreeMap::from([
                ("cpu".to_string(), cpu_quantity(cpu)),
                ("memory".to_string(), memory_quantity(memory)),
            ]),
            limits: BTreeMap::from([("memory".to_string(), memory_quantity(limit))]),
        }
    };
    let spread_replicas = |labels: &BTreeMap<String, String>| {
        ha.then(|| Affinity {
            pod_anti_affinity: PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: vec![PodAffinityTerm {
                    label_selector: LabelSelector { match_labels: labels.clone() },
                    topology_key: HOSTNAME_TOPOLOGY_KEY,
                }],
            },
        })
    };
    let scheduling = |labels: &BTreeMap<String, String>| Scheduling {
        node_selector: selector.clone(),
        tolerations: tolerations.clone(),
        affinity: spread_replicas(labels),
    };

    let control_plane_labels = pod_labels(name, "control-plane");
    let stateful_set = ControlPlaneStatefulSet {
        high_availability: HighAvailability { replicas: size.replicas },
        resources: component(&settings.control_plane, cpu_budget - etcd_cpu_budget, memory_budget - etcd_memory_budget),
        scheduling: scheduling(&control_plane_labels),
        pods: PodMetadata { labels: control_plane_labels },
    };
    let backing_store = match (ha, settings.ha_backing_store) {
        (false, _) => None,
        (true, HaBackingStore::EmbeddedEtcd) => {
            Some(BackingStore { etcd: Etcd { embedded: Some(Enabled { enabled: true }), deploy: None } })
        }
        (true, HaBackingStore::DeployedEtcd) => {
            let etcd_labels = pod_labels(name, "etcd");
            Some(BackingStore {
                etcd: Etcd {
                    embedded: None,
                    deploy: Some(EtcdDeploy {
                        enabled: true,
                        stateful_set: ControlPlaneStatefulSet {
                            high_availability: HighAvailability { replicas: size.replicas },
                            resources: component(&settings.etcd, etcd_cpu_budget, etcd_memory_budget),
                            scheduling: scheduling(&etcd_labels),
                            pods: PodMetadata { labels: etcd_labels },
                        },
                    }),
                },
            })
        }
    };

    let quota = BTreeMap::from([
        ("requests.cpu".to_string(), Some(cpu_quantity(size.total_cpu_millis))),
        ("requests.memory".to_string(), Some(memory_quantity(size.total_memory_bytes))),
        ("count/pods".to_string(), Some(size.total_pods.to_string())),
        ("limits.cpu".to_string(), None),
        ("limits.memory".to_string(), None),
    ]);
    let default_memory_limit = settings.containers.memory_limit_bytes.min(size.node_memory_bytes);
    let limit_range = LimitRange {
        enabled: true,
        default: BTreeMap::from([
            ("cpu".to_string(), cpu_quantity(size.node_cpu_millis)),
            ("memory".to_string(), memory_quantity(default_memory_limit)),
        ]),
        default_request: BTreeMap::from([
            ("cpu".to_string(), cpu_quantity(settings.containers.cpu_request_millis.min(size.node_cpu_millis))),
            (
                "memory".to_string(),
                memory_quantity(round_down_mib(settings.containers.memory_request_bytes.min(default_memory_limit))),
            ),
        ]),
    };

    Ok(VclusterValues {
        control_plane: ControlPlane { backing_store, stateful_set },
        sync: SyncConfig {
            from_host: SyncFromHost {
                nodes: SyncNodes {
                    enabled: true,
                    clear_image_status: true,
                    selector: SyncNodeSelector { all: false, labels: selector.clone() },
                },
            },
            to_host: SyncToHost {
                pods: SyncPods {
                    enforce_tolerations: if size.dedicated { vec![taint.to_string()] } else { Vec::new() },
                },
            },
        },
        policies: Policies {
            pod_security_standard: settings.pod_security,
            resource_quota: ResourceQuota { enabled: true, quota },
            limit_range,
            network_policy: Enabled { enabled: true },
        },
    })
}
