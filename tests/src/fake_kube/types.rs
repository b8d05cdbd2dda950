//! What tests name: verbs, faults, the request log, resource definitions, controller settings.

use std::time::Duration;

/// The verbs of the Kubernetes API, as RBAC names them; [`Verb::Any`] matches every verb.
/// Server-side apply is a `Patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    Any,
}

impl Verb {
    /// The RBAC name: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Any => "*",
        }
    }

    pub(super) fn matches(self, actual: Verb) -> bool {
        self == Verb::Any || self == actual
    }
}

/// How a deleted namespace goes from `Terminating` to gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceDeletion {
    /// The namespace controller runs right after the DELETE: the namespace's objects are deleted
    /// (those with finalizers wait for them), and the namespace is removed once it is empty.
    Immediate,
    /// The namespace stays `Terminating` (and refuses new content) until the test calls
    /// [`FakeKube::finish_namespace_deletion`](super::FakeKube::finish_namespace_deletion).
    Manual,
    /// As `Manual`, with the fake calling `finish_namespace_deletion` itself after this long.
    After(Duration),
}

/// What the fake helm-controller does. The default mirrors helm-controller and leaves the
/// outcome of every Job, and the readiness of the vCluster StatefulSet, to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelmControllerSettings {
    /// Off: HelmCharts are stored and nothing else happens (no Job, no finalizer).
    pub enabled: bool,
    /// Complete every `helm-install-*` Job as soon as it is created.
    pub complete_install: bool,
    /// Complete every `helm-delete-*` Job as soon as it is created.
    pub complete_delete: bool,
    /// A completed install creates (or scales) the release's StatefulSet `<chart name>` in the
    /// target namespace, with `spec.replicas` from the values
    /// (`controlPlane.statefulSet.highAvailability.replicas`, default 1); a completed delete
    /// removes it.
    pub install_statefulset: bool,
    /// The StatefulSet reports all replicas ready as soon as it is installed.
    pub statefulset_ready: bool,
}

impl Default for HelmControllerSettings {
    fn default() -> Self {
        HelmControllerSettings {
            enabled: true,
            complete_install: false,
            complete_delete: false,
            install_statefulset: true,
            statefulset_ready: false,
        }
    }
}

impl HelmControllerSettings {
    /// Every Job succeeds at once and every StatefulSet is ready at once: for benchmarks and for
    /// tests that are not about the Helm lifecycle.
    pub fn instant() -> Self {
        HelmControllerSettings {
            complete_install: true,
            complete_delete: true,
            statefulset_ready: true,
            ..Self::default()
        }
    }
}

/// One request the server answered (or refused on purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `None` for discovery and unknown paths.
    pub verb: Option<Verb>,
    /// Plural of the resource addressed, empty for discovery.
    pub resource: String,
    pub status: u16,
    /// The request changed stored state (bumped a resourceVersion).
    pub changed: bool,
    /// `Warning` headers sent back (e.g. unknown fields dropped from a HelmChart).
    pub warnings: Vec<String>,
}

/// A programmed failure: the next `count` requests matching `verb` and `resource` (and `name`,
/// when set) are answered with `status` and a `Status` body, without touching any state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub verb: Verb,
    /// Plural (`helmcharts`), `plural.group` (`helmcharts.helm.cattle.io`), or `*`.
    pub resource: String,
    pub name: Option<String>,
    /// 400, 401, 403, 404, 409, 410, 422, 429, 500, 503 or 504; others answer InternalError.
    pub status: u16,
    pub count: u32,
    /// Replaces the realistic message the fake would write.
    pub message: Option<String>,
}

impl Fault {
    pub fn new(verb: Verb, resource: &str, status: u16, count: u32) -> Self {
        Fault { verb, resource: resource.to_string(), name: None, status, count, message: None }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn message(mut self, message: &str) -> Self {
        self.message = Some(message.to_string());
        self
    }
}

/// A resource the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a `status` subresource: writes to the main resource leave `status` alone and writes to
    /// `/status` change nothing else.
    pub status_subresource: bool,
    pub short_names: Vec<String>,
    /// Served through a CRD: list items keep `apiVersion`/`kind`, strategic merge patch is
    /// refused (415), and a DELETE answers with the object instead of a `Status`.
    pub custom: bool,
}

impl ResourceDef {
    /// A custom resource, namespaced or not, with a status subresource.
    pub fn custom(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        ResourceDef {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_string(),
            namespaced,
            status_subresource: true,
            short_names: Vec::new(),
            custom: true,
        }
    }

    pub(super) fn builtin(
        group: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
        short: &[&str],
    ) -> Self {
        ResourceDef {
            group: group.to_string(),
            version: "v1".to_string(),
            plural: plural.to_string(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_string(),
            namespaced,
            status_subresource: status,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            custom: false,
        }
    }

    /// `v1` or `group/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `namespaces`, `helmcharts.helm.cattle.io`: how the API server names the resource in messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    pub(super) fn group_kind(&self) -> String {
        if self.group.is_empty() { self.kind.clone() } else { format!("{}.{}", self.kind, self.group) }
    }

    pub(super) fn answers_to(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        name == self.plural
            || name == self.singular
            || name == self.group_resource()
            || name == format!("{}.{}.{}", self.plural, self.version, self.group)
            || name == self.kind.to_ascii_lowercase()
            || self.short_names.contains(&name)
    }

    pub(super) fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    pub(super) fn is_helmchart(&self) -> bool {
        self.group == "helm.cattle.io" && self.plural == "helmcharts"
    }

    pub(super) fn verbs(&self) -> Vec<&'static str> {
        vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    }
}

pub(super) fn builtin_resources() -> Vec<ResourceDef> {
    use ResourceDef as R;
    let mut helmcharts = R::custom("helm.cattle.io", "v1", "helmcharts", "HelmChart", true);
    helmcharts.short_names = vec!["hc".to_string()];
    let mut helmchartconfigs = R::custom("helm.cattle.io", "v1", "helmchartconfigs", "HelmChartConfig", true);
    helmchartconfigs.status_subresource = false;
    vec![
        R::builtin("", "namespaces", "Namespace", false, true, &["ns"]),
        R::builtin("", "nodes", "Node", false, true, &["no"]),
        R::builtin("", "configmaps", "ConfigMap", true, false, &["cm"]),
        R::builtin("", "secrets", "Secret", true, false, &[]),
        R::builtin("", "serviceaccounts", "ServiceAccount", true, false, &["sa"]),
        R::builtin("", "services", "Service", true, true, &["svc"]),
        R::builtin("", "pods", "Pod", true, true, &["po"]),
        R::builtin("", "persistentvolumeclaims", "PersistentVolumeClaim", true, true, &["pvc"]),
        R::builtin("", "resourcequotas", "ResourceQuota", true, true, &["quota"]),
        R::builtin("", "limitranges", "LimitRange", true, false, &["limits"]),
        R::builtin("apps", "statefulsets", "StatefulSet", true, true, &["sts"]),
        R::builtin("apps", "deployments", "Deployment", true, true, &["deploy"]),
        R::builtin("apps", "daemonsets", "DaemonSet", true, true, &["ds"]),
        R::builtin("batch", "jobs", "Job", true, true, &[]),
        R::builtin("batch", "cronjobs", "CronJob", true, true, &["cj"]),
        R::builtin("networking.k8s.io", "networkpolicies", "NetworkPolicy", true, false, &["netpol"]),
        R::builtin("rbac.authorization.k8s.io", "roles", "Role", true, false, &[]),
        R::builtin("rbac.authorization.k8s.io", "rolebindings", "RoleBinding", true, false, &[]),
        R::builtin("rbac.authorization.k8s.io", "clusterroles", "ClusterRole", false, false, &[]),
        R::builtin("rbac.authorization.k8s.io", "clusterrolebindings", "ClusterRoleBinding", false, false, &[]),
        helmcharts,
        helmchartconfigs,
    ]
}
