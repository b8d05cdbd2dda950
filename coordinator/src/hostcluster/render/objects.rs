//! The Kubernetes objects of a tenant, built from `k8s-openapi` types (`Namespace`, partial `Node`s)
//! and the [`HelmChart`] custom resource, and the same objects as YAML files for the `manifests`
//! mode.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, Taint as KubeTaint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use hexa_shared::names::{tenant_label, tenant_namespace};
use hexa_shared::spec::{POOL_LABEL, Taint};
use hexa_shared::tenant::{NodeClass, Tenant};

use super::{
    CHART_NAME, FIELD_MANAGER, HELM_CHART_NAMESPACE, MANAGED_BY_LABEL, RenderError, RenderSettings, TENANT_LABEL,
    dedicated_taint, release_name, vcluster_values,
};
use crate::hostcluster::helmchart::{HelmChart, HelmChartSpec};

/// What one node must carry for the tenants it holds.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeMarks {
    pub labels: BTreeMap<String, String>,
    /// Sorted.
    pub taints: Vec<Taint>,
}

fn common_labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
        (TENANT_LABEL.to_string(), tenant.to_string()),
    ])
}

/// The namespace `hx-<tenant>`: tenant label, managed-by label, and Pod Security Admission labels
/// (enforce at [`host_enforce`](super::PodSecurityLevel::host_enforce) of the configured level,
/// audit and warn at the configured level, each with its version label).
pub fn namespace(tenant: &Tenant, settings: &RenderSettings) -> Namespace {
    let mut labels = common_labels(&tenant.name);
    let level = settings.pod_security;
    for (mode, mode_level) in [("enforce", level.host_enforce()), ("audit", level), ("warn", level)] {
        labels.insert(format!("pod-security.kubernetes.io/{mode}"), mode_level.as_str().to_string());
        labels.insert(format!("pod-security.kubernetes.io/{mode}-version"), settings.pod_security_version.clone());
    }
    Namespace {
        metadata: ObjectMeta {
            name: Some(tenant_namespace(&tenant.name)),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
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
/// (managed keys, see [`is_managed_label`](super::is_managed_label) and [`is_managed_taint`](super::is_managed_taint), not listed for a node are
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

/// The K3s `HelmChart` installing the pinned vcluster chart into `hx-<tenant>` with
/// [`vcluster_values`] as `spec.valuesContent`.
pub fn helm_chart(tenant: &Tenant, classes: &[NodeClass], settings: &RenderSettings) -> Result<HelmChart, RenderError> {
    let values = vcluster_values(tenant, classes, settings)?;
    Ok(HelmChart {
        metadata: ObjectMeta {
            name: Some(release_name(&tenant.name)),
            namespace: Some(HELM_CHART_NAMESPACE.to_string()),
            labels: Some(common_labels(&tenant.name)),
            ..ObjectMeta::default()
        },
        spec: HelmChartSpec {
            chart: Some(CHART_NAME.to_string()),
            repo: Some(settings.chart_repo.clone()),
            version: Some(settings.chart_version.clone()),
            target_namespace: Some(tenant_namespace(&tenant.name)),
            // The coordinator creates the namespace itself, with its labels.
            create_namespace: Some(false),
            failure_policy: Some(settings.failure_policy),
            values_content: Some(to_yaml("vCluster values", &values)?),
            ..HelmChartSpec::default()
        },
        status: None,
    })
}

/// The partial Node object that makes `node` carry `marks` under server-side apply: only the
/// labels and taints given, each left out when there are none (applying it then releases the
/// managed ones the node carried).
pub fn node_patch(node: &str, marks: &NodeMarks) -> Node {
    let labels = (!marks.labels.is_empty()).then(|| marks.labels.clone());
    let taints = (!marks.taints.is_empty()).then(|| marks.taints.iter().map(kube_taint).collect());
    Node {
        metadata: ObjectMeta { name: Some(node.to_string()), labels, ..ObjectMeta::default() },
        spec: taints.map(|taints| NodeSpec { taints: Some(taints), ..NodeSpec::default() }),
        status: None,
    }
}

fn kube_taint(taint: &Taint) -> KubeTaint {
    KubeTaint {
        key: taint.key.clone(),
        value: Some(taint.value.clone()),
        effect: format!("{:?}", taint.effect),
        time_added: None,
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
