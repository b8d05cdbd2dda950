//! The K3s `HelmChart` custom resource (`helm.cattle.io/v1`, namespaced), as the helm-controller
//! bundled in K3s v1.35 defines it (`helm.cattle.io_helmcharts.yaml`, helm-controller v0.17.1).
//!
//! Every spec field of the CRD is here, with the CRD's name and type; the CRD requires none of
//! them, so each is optional and left out of the object when unset (server-side apply then claims
//! only what is set). The schema lives in the CRD the helm-controller installs, so none is derived
//! here; the rendering tests hold every rendered object against that CRD's schema.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, PodSecurityContext, SecurityContext};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `spec` of a `HelmChart`. Fields are in the order the rendered manifests show them: what this
/// coordinator sets first, then the rest of the CRD's fields alphabetically.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[kube(
    group = "helm.cattle.io",
    version = "v1",
    kind = "HelmChart",
    plural = "helmcharts",
    namespaced,
    status = "HelmChartStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct HelmChartSpec {
    /// Chart name in the repository, or the HTTPS URL of a chart archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
    /// Chart repository URL (`--repo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Chart version; only used when installing from a repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Namespace of the release (`--namespace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    /// Create the target namespace if it is missing (`--create-namespace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_namespace: Option<bool>,
    /// What the helm-controller does when an install or upgrade fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
    /// Chart values as inline YAML (`--values`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values_content: Option<String>,

    /// Pass basic-auth credentials to all domains (`--pass-credentials`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_pass_credentials: Option<bool>,
    /// Secret of type `kubernetes.io/basic-auth` with the repository's credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<LocalObjectReference>,
    /// Retries before the helm Job counts as failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_off_limit: Option<i32>,
    /// The chart is needed to bootstrap the cluster (CNI, cloud controller manager).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<bool>,
    /// Base64-encoded chart archive; overrides `chart` and `version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart_content: Option<String>,
    /// Secret of type `kubernetes.io/dockerconfigjson` for an OCI registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry_secret: Option<LocalObjectReference>,
    /// Where Helm keeps the release's metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<HelmDriver>,
    /// Deprecated: only Helm v3 is supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helm_version: Option<String>,
    /// Skip TLS certificate checks for the chart download.
    #[serde(rename = "insecureSkipTLSVerify", skip_serializing_if = "Option::is_none")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// Image of the helm Job's pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_image: Option<String>,
    /// Plain HTTP for the chart download.
    #[serde(rename = "plainHTTP", skip_serializing_if = "Option::is_none")]
    pub plain_http: Option<bool>,
    /// Pod security context of the helm Job's pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// CA bundle to verify the repository with.
    #[serde(rename = "repoCA", skip_serializing_if = "Option::is_none")]
    pub repo_ca: Option<String>,
    /// ConfigMap with CA certificates to verify the repository with.
    #[serde(rename = "repoCAConfigMap", skip_serializing_if = "Option::is_none")]
    pub repo_ca_config_map: Option<LocalObjectReference>,
    /// Security context of the helm Job's container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Simple values (`--set`, `--set-string`); they take precedence over `values` and `valuesContent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<BTreeMap<String, IntOrString>>,
    /// Let Helm take ownership of existing resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub take_ownership: Option<bool>,
    /// Timeout of Helm operations (`--timeout`), e.g. `5m0s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Structured values; they take precedence over `valuesContent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<serde_json::Value>,
    /// Values read from Secrets in the HelmChart's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values_secrets: Option<Vec<HelmChartValuesSecret>>,
}

/// `spec.failurePolicy`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Leave the release failed.
    Abort,
    /// Uninstall and install again.
    Reinstall,
}

/// `spec.driver`: Helm's storage driver for release metadata.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HelmDriver {
    Secret,
    Configmap,
}

/// One item of `spec.valuesSecrets`: keys of a Secret to read values from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HelmChartValuesSecret {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_updates: Option<bool>,
}

/// `status` of a `HelmChart`, written by the helm-controller.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HelmChartStatus {
    /// `JobCreated`, and `Failed` when the failure policy is `abort`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<HelmChartCondition>>,
    /// The Job that installs or upgrades the chart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct HelmChartCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
