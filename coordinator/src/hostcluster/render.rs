//! Pure rendering of a tenant's objects on the host cluster: from a
//! [`Tenant`](hexa_shared::tenant::Tenant) (its plan and placement), the configured node classes
//! and [`RenderSettings`] to
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
//! This module holds the settings and the names; `values` turns a plan into the vCluster values
//! (and says how), `objects` builds the Kubernetes objects from `k8s-openapi` types and the
//! [`HelmChart`](super::helmchart::HelmChart) custom resource.

use serde::{Deserialize, Serialize};

use hexa_shared::names::TENANT_LABEL_PREFIX;
use hexa_shared::spec::{DEDICATED_TAINT, POOL_LABEL, Taint, TaintEffect};
use hexa_shared::tenant::TenantError;

use crate::config::error::ConfigError;

pub use super::helmchart::FailurePolicy;

mod objects;
mod values;

pub use objects::*;
pub use values::*;

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
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.chart_repo.starts_with("https://") && !self.chart_repo.starts_with("oci://") {
            return Err(ConfigError::NotChartRepo { key: "hostcluster.chart_repo", value: self.chart_repo.clone() });
        }
        if self.chart_version.is_empty() || self.chart_version.chars().any(char::is_whitespace) {
            return Err(ConfigError::NotChartVersion {
                key: "hostcluster.chart_version",
                value: self.chart_version.clone(),
            });
        }
        let version_ok = self.pod_security_version == "latest"
            || self
                .pod_security_version
                .strip_prefix("v1.")
                .is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()));
        if !version_ok {
            return Err(ConfigError::NotPodSecurityVersion {
                key: "hostcluster.pod_security_version",
                value: self.pod_security_version.clone(),
            });
        }
        for (key, resources) in
            [("control_plane", &self.control_plane), ("etcd", &self.etcd), ("containers", &self.containers)]
        {
            if resources.cpu_request_millis == 0 || resources.memory_request_bytes == 0 {
                return Err(ConfigError::RequestsNothing { key: format!("hostcluster.{key}") });
            }
            if resources.memory_limit_bytes < resources.memory_request_bytes {
                return Err(ConfigError::LimitBelowRequest {
                    key: format!("hostcluster.{key}"),
                    limit: resources.memory_limit_bytes,
                    request: resources.memory_request_bytes,
                });
            }
        }
        if self.dedicated_pods_per_node == 0 {
            return Err(ConfigError::NoPodsPerNode { key: "hostcluster.dedicated_pods_per_node" });
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

fn dedicated_taint(tenant: &str) -> Taint {
    Taint { key: DEDICATED_TAINT.to_string(), value: tenant.to_string(), effect: TaintEffect::NoSchedule }
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
