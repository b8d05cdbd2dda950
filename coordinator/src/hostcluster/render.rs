//! Pure rendering of a tenant's objects on the host cluster: from a [`Tenant`] (its plan and
//! placement), the configured node classes and [`RenderSettings`] to
//!
//! - the namespace `hx-<tenant>` with the tenant and pod-security labels ([`namespace`]);
//! - the labels and taints each node the tenant holds must carry ([`node_marks`], merged over all
//!   tenants by [`merge_node_marks`]);
//! - the vCluster chart values ([`vcluster_values`]) and the K3s `HelmChart` that installs the chart
//!   with them ([`helm_chart`]);
//! - the same objects as YAML files for the `manifests` mode ([`manifests`], [`node_manifests`]).
//!
//! Nothing here does I/O. The values use only keys of the pinned chart's `values.schema.json`
//! (vcluster 0.36.1); the tests hold every rendered document against that schema and every
//! `HelmChart` against the CRD schema of the helm-controller K3s bundles.
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

use serde::{Deserialize, Serialize};

use hexa_shared::names::{TENANT_LABEL_PREFIX, tenant_label, tenant_namespace};
use hexa_shared::quantity::format_cpu_millis;
use hexa_shared::spec::{DEDICATED_TAINT, POOL_LABEL, Taint, TaintEffect};
use hexa_shared::tenant::{NodeClass, Plan, Tenant, TenantError};

pub use super::helmchart::FailurePolicy;

/// Field manager of every server-side apply of these objects.
pub const FIELD_MANAGER: &str = "hexa-coordinator";
/// Label naming the tenant an object belongs to.
pub const TENANT_LABEL: &str = "hexabase.ai/tenant";
/// Label naming the part of a tenant's vCluster a pod is (`control-plane`, `etcd`).
pub const COMPONENT_LABEL: &str = "hexabase.ai/component";
/// The standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Namespace the K3s helm-controller watches for `HelmChart` objects.
pub const HELM_CHART_NAMESPACE: &str = "kube-system";
/// The chart installed for every tenant.
pub const CHART_NAME: &str = "vcluster";
/// Node label that spreads control-plane replicas over distinct nodes.
pub const HOSTNAME_TOPOLOGY_KEY: &str = "kubernetes.io/hostname";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The name of the tenant's `HelmChart`, which is also its Helm release and the name of the
/// vCluster StatefulSet in the tenant namespace: `vcluster-<tenant>`.
pub fn release_name(tenant: &str) -> String {
    format!("vcluster-{tenant}")
}

/// True for the node labels this module renders (and so a reconciler may remove when no tenant
/// needs them any more).
pub fn is_managed_label(key: &str) -> bool {
    key == POOL_LABEL || key.starts_with(TENANT_LABEL_PREFIX)
}

/// True for the node taints this module renders.
pub fn is_managed_taint(key: &str) -> bool {
    key == DEDICATED_TAINT
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// How tenants are rendered; the `[hostcluster]` table of the coordinator's configuration. Every key
/// is optional. A nested resources table (`control_plane`, `etcd`, `containers`), when given, must
/// have all three keys.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RenderSettings {
    /// Where tenants' objects go: `apply` them to the host cluster through its API, write them as
    /// YAML `manifests` under `manifests_dir` (GitOps, or no cluster), or `off`.
    pub mode: Mode,
    /// Directory of the `manifests` mode.
    pub manifests_dir: std::path::PathBuf,
    /// Kubeconfig of the host cluster for the `apply` mode; empty: `KUBECONFIG`, `~/.kube/config`,
    /// or the in-cluster service account, as kubectl finds them.
    pub kubeconfig: String,
    /// Helm repository of the vcluster chart.
    pub chart_repo: String,
    /// Chart version. The values are written for (and tested against) the schema of 0.36.1; change
    /// it together with this module.
    pub chart_version: String,
    /// Pod Security Standard: `baseline`, `restricted` or `privileged`.
    pub pod_security: PodSecurityLevel,
    /// Value of the `pod-security.kubernetes.io/*-version` namespace labels: `latest` or a
    /// Kubernetes minor version such as `v1.33`.
    pub pod_security_version: String,
    /// What the helm-controller does when an install or upgrade fails: `abort` (leave it failed for
    /// the coordinator to report; the tenant's data stays) or `reinstall` (uninstall and install
    /// again).
    pub failure_policy: FailurePolicy,
    /// Where a three-replica control plane keeps its state: `deployed_etcd` (an etcd StatefulSet
    /// the chart deploys; open source) or `embedded_etcd` (etcd inside the control plane; needs a
    /// vCluster Pro licence).
    pub ha_backing_store: HaBackingStore,
    /// Resources of one control-plane replica (before the plan's cap, see [`vcluster_values`]).
    pub control_plane: ComponentResources,
    /// Resources of one etcd replica of a three-replica control plane.
    pub etcd: ComponentResources,
    /// Requests and memory limit given to containers that state none (`policies.limitRange`).
    pub containers: ComponentResources,
    /// Pods a dedicated node may run (the kubelet's `maxPods`); the quota of a dedicated tenant is
    /// this times its node count.
    pub dedicated_pods_per_node: u32,
}

/// Where the host-cluster objects go.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Apply,
    Manifests,
    Off,
}

impl Default for RenderSettings {
    fn default() -> Self {
        RenderSettings {
            mode: Mode::Apply,
            manifests_dir: std::path::PathBuf::from("/var/lib/hexabase/coordinator/manifests"),
            kubeconfig: String::new(),
            chart_repo: "https://charts.loft.sh".to_string(),
            chart_version: "0.36.1".to_string(),
            pod_security: PodSecurityLevel::Baseline,
            pod_security_version: "latest".to_string(),
            failure_policy: FailurePolicy::Abort,
            ha_backing_store: HaBackingStore::DeployedEtcd,
            control_plane: ComponentResources {
                cpu_request_millis: 200,
                memory_request_bytes: 256 * MIB,
                memory_limit_bytes: 2 * GIB,
            },
            etcd: ComponentResources {
                cpu_request_millis: 20,
                memory_request_bytes: 150 * MIB,
                memory_limit_bytes: GIB,
            },
            containers: ComponentResources {
                cpu_request_millis: 100,
                memory_request_bytes: 128 * MIB,
                memory_limit_bytes: 512 * MIB,
            },
            dedicated_pods_per_node: 110,
        }
    }
}

impl RenderSettings {
    /// Checks what serde cannot; the message names the key and what to write instead.
    pub fn validate(&self) -> Result<(), String> {
        if !self.chart_repo.starts_with("https://") && !self.chart_repo.starts_with("oci://") {
            return Err(format!(
                "hostcluster.chart_repo {:?} is not a chart repository URL: write https://... or oci://...",
                self.chart_repo
            ));
        }
        if self.chart_version.is_empty() || self.chart_version.chars().any(char::is_whitespace) {
            return Err(format!(
                "hostcluster.chart_version {:?} is not a version: pin one, e.g. 0.36.1",
                self.chart_version
            ));
        }
        let version_ok = self.pod_security_version == "latest"
            || self
                .pod_security_version
                .strip_prefix("v1.")
                .is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()));
        if !version_ok {
            return Err(format!(
                "hostcluster.pod_security_version {:?} is not a Pod Security version: write latest or v1.<minor>, e.g. v1.33",
                self.pod_security_version
            ));
        }
        for (key, resources) in
            [("control_plane", &self.control_plane), ("etcd", &self.etcd), ("containers", &self.containers)]
        {
            if resources.cpu_request_millis == 0 || resources.memory_request_bytes == 0 {
                return Err(format!(
                    "hostcluster.{key} requests nothing: set cpu_request_millis and memory_request_bytes above 0"
                ));
            }
            if resources.memory_limit_bytes < resources.memory_request_bytes {
                return Err(format!(
                    "hostcluster.{key}.memory_limit_bytes ({}) is below memory_request_bytes ({}): raise the limit",
                    resources.memory_limit_bytes, resources.memory_request_bytes
                ));
            }
        }
        if self.dedicated_pods_per_node == 0 {
            return Err("hostcluster.dedicated_pods_per_node is 0: set the kubelet's maxPods, e.g. 110".into());
        }
        Ok(())
    }
}

/// CPU and memory of one container.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ComponentResources {
    pub cpu_request_millis: u64,
    pub memory_request_bytes: u64,
    pub memory_limit_bytes: u64,
}

/// A Pod Security Standard level.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    Privileged,
    Baseline,
    Restricted,
}

impl PodSecurityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            PodSecurityLevel::Privileged => "privileged",
            PodSecurityLevel::Baseline => "baseline",
            PodSecurityLevel::Restricted => "restricted",
        }
    }

    /// The level enforced on the host namespace. The vCluster control plane runs there as root
    /// (the chart's default security context), which `restricted` forbids, so a `restricted` tenant
    /// gets `baseline` enforced on the host namespace (with `restricted` audited and warned there)
    /// and `restricted` enforced by the vCluster itself on every pod it accepts.
    pub fn host_enforce(self) -> PodSecurityLevel {
        self.min(PodSecurityLevel::Baseline)
    }
}

/// Backing store of a three-replica control plane.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HaBackingStore {
    DeployedEtcd,
    EmbeddedEtcd,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot render tenant {tenant}: {source}")]
    Plan { tenant: String, source: TenantError },
    #[error(
        "node {node} is claimed twice: {first} and {second}; a node is either shared or dedicated to one tenant, so fix the placement"
    )]
    NodeConflict { node: String, first: String, second: String },
    #[error("cannot write {what} as YAML: {source}")]
    Yaml { what: String, source: serde_norway::Error },
}

// ---------------------------------------------------------------------------------------------
// Kubernetes objects
// ---------------------------------------------------------------------------------------------

/// The metadata this module sets; everything else belongs to the server.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A `v1` Namespace.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ObjectMeta,
}

/// A `helm.cattle.io/v1` HelmChart.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HelmChart {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ObjectMeta,
    pub spec: HelmChartSpec,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HelmChartSpec {
    pub chart: String,
    pub repo: String,
    pub version: String,
    pub target_namespace: String,
    /// False: the coordinator creates the namespace itself, with its labels.
    pub create_namespace: bool,
    pub failure_policy: FailurePolicy,
    /// The vCluster values as YAML.
    pub values_content: String,
}

/// A partial `v1` Node: only the labels and taints this module manages, for server-side apply.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodePatch {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ObjectMeta,
    #[serde(skip_serializing_if = "NodePatchSpec::is_empty")]
    pub spec: NodePatchSpec,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePatchSpec {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

impl NodePatchSpec {
    fn is_empty(&self) -> bool {
        self.taints.is_empty()
    }
}

/// What one node must carry for the tenants it holds.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeMarks {
    pub labels: BTreeMap<String, String>,
    /// Sorted.
    pub taints: Vec<Taint>,
}

// ---------------------------------------------------------------------------------------------
// vCluster values (vcluster chart 0.36.1, values.schema.json). Field names are the schema's keys.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

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

fn common_labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
        (TENANT_LABEL.to_string(), tenant.to_string()),
    ])
}

fn dedicated_taint(tenant: &str) -> Taint {
    Taint { key: DEDICATED_TAINT.to_string(), value: tenant.to_string(), effect: TaintEffect::NoSchedule }
}

/// The namespace `hx-<tenant>`: tenant label, managed-by label, and Pod Security Admission labels
/// (enforce at [`PodSecurityLevel::host_enforce`], audit and warn at the configured level, each with
/// its version label).
pub fn namespace(tenant: &Tenant, settings: &RenderSettings) -> Namespace {
    let mut labels = common_labels(&tenant.name);
    let level = settings.pod_security;
    for (mode, mode_level) in [("enforce", level.host_enforce()), ("audit", level), ("warn", level)] {
        labels.insert(format!("pod-security.kubernetes.io/{mode}"), mode_level.as_str().to_string());
        labels.insert(format!("pod-security.kubernetes.io/{mode}-version"), settings.pod_security_version.clone());
    }
    Namespace {
        api_version: "v1",
        kind: "Namespace",
        metadata: ObjectMeta { name: tenant_namespace(&tenant.name), namespace: None, labels },
    }
}

/// The labels and taints the tenant implies, per node: every node holding one of its shares gets
/// `hexabase.ai/pool=shared` and `tenant.hexabase.ai/<tenant>=true`; every node dedicated to it gets
/// `hexabase.ai/pool=dedicated`, the tenant label and the taint
/// `hexabase.ai/dedicated=<tenant>:NoSchedule`. A tenant moving between plans has both kinds.
pub fn node_marks(tenant: &Tenant) -> BTreeMap<String, NodeMarks> {
    let mut marks: BTreeMap<String, NodeMarks> = BTreeMap::new();
    for share in &tenant.placement.shares {
        let node = marks.entry(share.node.clone()).or_default();
        node.labels.insert(POOL_LABEL.to_string(), "shared".to_string());
        node.labels.insert(tenant_label(&tenant.name), "true".to_string());
    }
    for name in &tenant.placement.dedicated_nodes {
        let node = marks.entry(name.clone()).or_default();
        node.labels.insert(POOL_LABEL.to_string(), "dedicated".to_string());
        node.labels.insert(tenant_label(&tenant.name), "true".to_string());
        node.taints = vec![dedicated_taint(&tenant.name)];
    }
    marks
}

/// The labels and taints of every node, over all `tenants`: what a reconciler makes each node carry
/// (managed keys, see [`is_managed_label`] and [`is_managed_taint`], not listed for a node are
/// removed from it). Fails when two tenants' placements disagree about a node: a node shared by one
/// and dedicated to another, or dedicated to two.
pub fn merge_node_marks<'a>(
    tenants: impl IntoIterator<Item = &'a Tenant>,
) -> Result<BTreeMap<String, NodeMarks>, RenderError> {
    // node -> (merged marks, who decided its pool)
    let mut merged: BTreeMap<String, (NodeMarks, String)> = BTreeMap::new();
    for tenant in tenants {
        for (node, marks) in node_marks(tenant) {
            let claim = match marks.labels.get(POOL_LABEL).map(String::as_str) {
                Some("dedicated") => format!("dedicated to {}", tenant.name),
                _ => format!("a share of {}", tenant.name),
            };
            match merged.get_mut(&node) {
                None => {
                    merged.insert(node, (marks, claim));
                }
                Some((existing, first)) => {
                    let dedicated = |m: &NodeMarks| m.labels.get(POOL_LABEL).map(String::as_str) == Some("dedicated");
                    if dedicated(existing) || dedicated(&marks) {
                        return Err(RenderError::NodeConflict { node, first: first.clone(), second: claim });
                    }
                    existing.labels.extend(marks.labels);
                    existing.taints.extend(marks.taints);
                    existing.taints.sort();
                    existing.taints.dedup();
                }
            }
        }
    }
    Ok(merged.into_iter().map(|(node, (marks, _))| (node, marks)).collect())
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

/// The K3s `HelmChart` installing the pinned vcluster chart into `hx-<tenant>` with
/// [`vcluster_values`] as `spec.valuesContent`.
pub fn helm_chart(tenant: &Tenant, classes: &[NodeClass], settings: &RenderSettings) -> Result<HelmChart, RenderError> {
    let values = vcluster_values(tenant, classes, settings)?;
    Ok(HelmChart {
        api_version: "helm.cattle.io/v1",
        kind: "HelmChart",
        metadata: ObjectMeta {
            name: release_name(&tenant.name),
            namespace: Some(HELM_CHART_NAMESPACE.to_string()),
            labels: common_labels(&tenant.name),
        },
        spec: HelmChartSpec {
            chart: CHART_NAME.to_string(),
            repo: settings.chart_repo.clone(),
            version: settings.chart_version.clone(),
            target_namespace: tenant_namespace(&tenant.name),
            create_namespace: false,
            failure_policy: settings.failure_policy,
            values_content: to_yaml("vCluster values", &values)?,
        },
    })
}

/// The partial Node object that makes `node` carry `marks` under server-side apply.
pub fn node_patch(node: &str, marks: &NodeMarks) -> NodePatch {
    NodePatch {
        api_version: "v1",
        kind: "Node",
        metadata: ObjectMeta { name: node.to_string(), namespace: None, labels: marks.labels.clone() },
        spec: NodePatchSpec { taints: marks.taints.clone() },
    }
}

/// Any rendered object as YAML.
pub fn to_yaml<T: Serialize>(what: &str, object: &T) -> Result<String, RenderError> {
    serde_norway::to_string(object).map_err(|source| RenderError::Yaml { what: what.to_string(), source })
}

fn manifest_file(header: &str, what: &str, object: &impl Serialize) -> Result<String, RenderError> {
    Ok(format!("# {header}\n{}", to_yaml(what, object)?))
}

/// The tenant's objects as YAML files, relative paths under the manifests directory:
/// `tenants/<tenant>/namespace.yaml` and `tenants/<tenant>/helmchart.yaml`. Node labels and taints
/// are shared between tenants and come from [`node_manifests`].
pub fn manifests(
    tenant: &Tenant,
    classes: &[NodeClass],
    settings: &RenderSettings,
) -> Result<Vec<(String, String)>, RenderError> {
    let header = format!(
        "Rendered by hexa-coordinator for tenant {}; apply with server-side apply, field manager {FIELD_MANAGER}.",
        tenant.name
    );
    let dir = format!("tenants/{}", tenant.name);
    Ok(vec![
        (format!("{dir}/namespace.yaml"), manifest_file(&header, "namespace", &namespace(tenant, settings))?),
        (
            format!("{dir}/helmchart.yaml"),
            manifest_file(&header, "HelmChart", &helm_chart(tenant, classes, settings)?)?,
        ),
    ])
}

/// One file per node, `nodes/<node>.yaml`: a partial Node with the labels and taints of
/// [`merge_node_marks`], for server-side apply.
pub fn node_manifests(marks: &BTreeMap<String, NodeMarks>) -> Result<Vec<(String, String)>, RenderError> {
    marks
        .iter()
        .map(|(node, marks)| {
            let header = format!(
                "Rendered by hexa-coordinator: the labels and taints node {node} carries for its tenants; apply with server-side apply, field manager {FIELD_MANAGER}."
            );
            Ok((format!("nodes/{node}.yaml"), manifest_file(&header, "node", &node_patch(node, marks))?))
        })
        .collect()
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
