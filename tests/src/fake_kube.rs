//! A stateful fake Kubernetes API server on loopback, for testing the host-cluster reconciler
//! through the real `kube` client (its HTTP stack, its retries and its error handling).
//!
//! Written from the Kubernetes API conventions ("API Concepts", "Server-Side Apply") and from
//! k3s-io/helm-controller's `pkg/controllers/chart/chart.go`; HelmChart objects are held against
//! the CRD in `../shared/reference/helm-controller/helm.cattle.io_helmcharts.yaml`.
//!
//! What it serves, over plain HTTP/1.1 on `127.0.0.1:<random port>`:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`
//!   (legacy documents, and the aggregated `apidiscovery.k8s.io/v2` list when asked for it);
//! - namespaces, nodes, a handful of built-in namespaced kinds, `helmcharts.helm.cattle.io/v1`, and
//!   any kind a test registers with [`FakeKube::register_resource`];
//! - get, list (label and field selectors, `limit`/`continue`), watch, create, replace, patch
//!   (server-side apply, JSON merge patch, JSON patch), delete, deletecollection; the `status`
//!   subresource and `namespaces/<name>/finalize`;
//! - `Status` bodies with the reasons and codes a real API server uses (NotFound, AlreadyExists,
//!   Conflict, Invalid, Forbidden, BadRequest, UnsupportedMediaType, InternalError, ...).
//!
//! Server-side apply (see [`FakeKube`] docs for the model): each manager owns the leaf field paths
//! it applied, recorded in `metadata.managedFields` (`FieldsV1`); fields a manager stops applying
//! are removed unless another manager owns them; changing a field another manager owns is a 409
//! unless `force=true`; lists are atomic; an apply that changes nothing is not a write.
//!
//! A test plays the controllers: the fake helm-controller creates `helm-install-<chart>` Jobs and
//! holds the `wrangler.cattle.io/on-helm-chart-remove` finalizer until `helm-delete-<chart>`
//! completes; [`FakeKube::complete_job`], [`FakeKube::fail_job`] and
//! [`FakeKube::make_statefulset_ready`] move things on. Faults are programmed with
//! [`FakeKube::fail_next`], [`FakeKube::fail_all`], [`FakeKube::set_down`] and
//! [`FakeKube::set_latency`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Field manager the fake helm-controller writes with.
pub const HELM_CONTROLLER_MANAGER: &str = "helm-controller";
/// Finalizer helm-controller (through wrangler's remove handler) puts on every HelmChart it manages.
pub const HELM_CHART_FINALIZER: &str = "wrangler.cattle.io/on-helm-chart-remove";
/// Annotation helm-controller claims a HelmChart with.
pub const HELM_MANAGED_BY_ANNOTATION: &str = "helmcharts.cattle.io/managed-by";
/// Annotation that makes helm-controller leave a HelmChart alone.
pub const HELM_UNMANAGED_ANNOTATION: &str = "helmcharts.helm.cattle.io/unmanaged";
/// Label helm-controller puts on its Jobs, with the chart's name.
pub const HELM_CHART_LABEL: &str = "helmcharts.helm.cattle.io/chart";
/// Pod-template annotation with the hash of the chart's values.
pub const HELM_CONFIG_HASH_ANNOTATION: &str = "helmcharts.helm.cattle.io/configHash";
/// Where the HelmChart CRD lives, relative to the tests crate.
const HELMCHART_CRD: &str = "../../shared/reference/helm-controller/helm.cattle.io_helmcharts.yaml";
/// Watch events kept for watches that resume from a resourceVersion; older ones answer 410 Expired.
const EVENT_HISTORY: usize = 20_000;
/// Requests kept in the request log.
const REQUEST_LOG: usize = 200_000;

// =============================================================================================
// Public types
// =============================================================================================

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

    fn matches(self, actual: Verb) -> bool {
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
    /// [`FakeKube::finish_namespace_deletion`].
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

    fn builtin(group: &str, plural: &str, kind: &str, namespaced: bool, status: bool, short: &[&str]) -> Self {
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

    fn group_kind(&self) -> String {
        if self.group.is_empty() { self.kind.clone() } else { format!("{}.{}", self.kind, self.group) }
    }

    fn answers_to(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        name == self.plural
            || name == self.singular
            || name == self.group_resource()
            || name == format!("{}.{}.{}", self.plural, self.version, self.group)
            || name == self.kind.to_ascii_lowercase()
            || self.short_names.contains(&name)
    }

    fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    fn is_helmchart(&self) -> bool {
        self.group == "helm.cattle.io" && self.plural == "helmcharts"
    }

    fn verbs(&self) -> Vec<&'static str> {
        vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    }
}

fn builtin_resources() -> Vec<ResourceDef> {
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

// =============================================================================================
// The server handle
// =============================================================================================

/// The fake API server. Dropping it stops the server.
///
/// Server-side apply, as modelled (what the reconciler relies on):
/// - a field path is a chain of map keys; lists are atomic (a list is one field, owned whole),
///   maps are granular (each key is a field); `metadata.name`, `namespace`, `uid`,
///   `resourceVersion`, `generation`, `creationTimestamp`, `deletionTimestamp`, `managedFields`,
///   `apiVersion` and `kind` are never owned; on resources with a status subresource, `status` is
///   only written (and owned) through `/status`;
/// - an apply by manager M: the applied fields are merged into the object; fields M applied
///   before and leaves out now are removed unless another manager owns them; M now owns exactly
///   the leaf fields it applied;
/// - a conflict (409, reason `Conflict`, one `FieldManagerConflict` cause per field) is an apply
///   that would change the value of a field another manager owns, whether that manager applied
///   (`Apply`) or wrote it with create/update/patch (`Update`); `force=true` takes the field over;
///   managers that set the same value share the field;
/// - create, replace, merge patch and JSON patch are `Update` operations: the writer takes the
///   fields whose value it changed, the others lose them;
/// - a request that changes nothing (object and ownership) is not a write: no new
///   resourceVersion, no watch event, and it is not counted in [`FakeKube::changes`].
pub struct FakeKube {
    shared: Arc<Shared>,
    port: u16,
    runtime: Handle,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKube").field("url", &self.url()).finish_non_exhaustive()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
        self.shared.down.store(true, Ordering::SeqCst);
        self.shared.close_connections();
    }
}

impl FakeKube {
    /// Starts the server on `127.0.0.1:<random port>`, with namespaces `default`, `kube-system`,
    /// `kube-public` and `kube-node-lease`. Panics if it cannot listen (the test cannot go on).
    pub async fn start() -> FakeKube {
        match Self::try_start().await {
            Ok(kube) => kube,
            Err(e) => panic!("the fake Kubernetes API server could not listen on 127.0.0.1: {e}"),
        }
    }

    /// [`FakeKube::start`], returning the error instead of panicking.
    pub async fn try_start() -> io::Result<FakeKube> {
        let listener = bind(0)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::new(port));
        let runtime = Handle::current();
        let task = spawn_server(&runtime, shared.clone(), listener);
        Ok(FakeKube { shared, port, runtime, server: Mutex::new(Some(task)) })
    }

    /// `http://127.0.0.1:<port>`: the `cluster_url` of a `kube::Config`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A kubeconfig for this server (context `fake`, no credentials).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            url = self.url()
        )
    }

    // ----- reading state ---------------------------------------------------------------------

    /// The stored object, as a GET would return it. `resource` is a plural (`helmcharts`), a
    /// `plural.group`, a kind or a short name; `namespace` is `""` for cluster-scoped objects.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        let def = st.find_def(resource)?;
        st.objects.get(&Key::new(&def, namespace, name)).map(|s| s.obj.clone())
    }

    /// The stored objects of a resource, in one namespace (`Some`) or all (`None`), ordered by
    /// namespace and name.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let st = self.shared.lock();
        let Some(def) = st.find_def(resource) else { return Vec::new() };
        st.of_kind(&def.group, &def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, s)| s.obj.clone())
            .collect()
    }

    /// The last resourceVersion handed out (a global counter, as etcd's revision).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Mutating requests received (POST, PUT, PATCH, DELETE), whatever their outcome: refused,
    /// failed on purpose, dry-run or no-op included.
    pub fn writes(&self) -> u64 {
        self.shared.lock().writes
    }

    /// Requests that changed stored state (each bumped at least one resourceVersion). Changes the
    /// fake controllers make in reaction are not counted.
    pub fn changes(&self) -> u64 {
        self.shared.lock().changes
    }

    /// Sets [`FakeKube::writes`] and [`FakeKube::changes`] to zero and empties the request log.
    pub fn reset_counters(&self) {
        let mut st = self.shared.lock();
        st.writes = 0;
        st.changes = 0;
        st.log.clear();
    }

    /// Every request answered since the start or the last [`FakeKube::reset_counters`].
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    // ----- writing state directly ------------------------------------------------------------

    /// Creates or replaces an object as `manager` would with a POST or PUT (an `Update`
    /// operation), bypassing faults: to seed nodes, or to play another controller.
    pub fn upsert(&self, resource: &str, object: Value, manager: &str) -> Result<Value, String> {
        let result = {
            let mut st = self.shared.lock();
            let def = st.find_def(resource).ok_or_else(|| format!("no resource {resource:?}"))?;
            let r = st.upsert(&def, object, manager).map_err(|e| e.message);
            st.run_controllers();
            r
        };
        self.after_change();
        result
    }

    /// A node named `name` with `labels`, registered as the K3s agent does (manager `k3s`).
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)]) -> Result<Value, String> {
        let mut all: Map<String, Value> = Map::new();
        all.insert("kubernetes.io/hostname".into(), json!(name));
        all.insert("kubernetes.io/os".into(), json!("linux"));
        for (k, v) in labels {
            all.insert(k.to_string(), json!(v));
        }
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": all},
            "spec": {"podCIDR": "10.42.0.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}
        });
        self.upsert("nodes", node, "k3s")
    }

    /// Deletes an object as a DELETE would (finalizers are honoured), bypassing faults.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Result<(), String> {
        let result = {
            let mut st = self.shared.lock();
            let def = st.find_def(resource).ok_or_else(|| format!("no resource {resource:?}"))?;
            let key = Key::new(&def, namespace, name);
            let r = match st.delete_object(&key, false) {
                Some(_) => Ok(()),
                None => Err(format!("{} {namespace}/{name} not found", def.group_resource())),
            };
            st.run_controllers();
            r
        };
        self.after_change();
        result
    }

    /// Serves another resource (a custom resource, usually), or replaces the definition of one.
    pub fn register_resource(&self, def: ResourceDef) {
        let mut st = self.shared.lock();
        st.resources.retain(|(d, _)| !(d.group == def.group && d.plural == def.plural));
        st.resources.push((def, true));
    }

    /// Stops (`false`) or resumes serving a resource, as when its CRD is missing: requests to an
    /// unknown group get the plain-text `404 page not found` a real API server sends, and
    /// discovery leaves it out. Stored objects are kept. Returns false for an unknown resource.
    pub fn set_served(&self, resource: &str, served: bool) -> bool {
        let mut st = self.shared.lock();
        let mut found = false;
        for (def, s) in st.resources.iter_mut() {
            if def.answers_to(resource) {
                *s = served;
                found = true;
            }
        }
        found
    }

    // ----- faults ----------------------------------------------------------------------------

    /// The next `count` requests with `verb` on `resource` (plural, `plural.group` or `*`) are
    /// answered with `status` and a realistic `Status` body; nothing is changed.
    pub fn fail_next(&self, verb: Verb, resource: &str, status: u16, count: u32) {
        self.inject(Fault::new(verb, resource, status, count));
    }

    /// Programs a fault (see [`Fault`]); faults are matched in the order they were added.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    /// Drops the faults not used up yet.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every request, discovery included, is answered with `status` (e.g. 500 or 503) until
    /// `fail_all(None)`.
    pub fn fail_all(&self, status: Option<u16>) {
        self.shared.lock().fail_all = status;
    }

    /// Every request waits this long before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// `true`: the server stops listening and closes every open connection (clients get
    /// "connection refused" or a reset); `false`: it listens again on the same port, with its
    /// state intact. Call from within the Tokio runtime the server was started in, or any thread.
    pub fn set_down(&self, down: bool) {
        let mut server = lock(&self.server);
        if down {
            self.shared.down.store(true, Ordering::SeqCst);
            if let Some(task) = server.take() {
                task.abort();
            }
            self.shared.close_connections();
        } else if server.is_none() {
            let _guard = self.runtime.enter();
            // The aborted listener may not be dropped yet: SO_REUSEPORT lets the new one bind now,
            // and connections the old one still accepts are closed on arrival while `down` is set.
            let mut last_error = None;
            for _ in 0..50 {
                match bind(self.port) {
                    Ok(listener) => {
                        self.shared.down.store(false, Ordering::SeqCst);
                        *server = Some(spawn_server(&self.runtime, self.shared.clone(), listener));
                        return;
                    }
                    Err(e) => {
                        last_error = Some(e);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            panic!("the fake Kubernetes API server could not listen again on port {}: {last_error:?}", self.port);
        }
    }

    // ----- playing the controllers -----------------------------------------------------------

    /// How namespaces are finalized after a DELETE (default [`NamespaceDeletion::Immediate`]).
    pub fn set_namespace_deletion(&self, mode: NamespaceDeletion) {
        self.shared.lock().ns_deletion = mode;
    }

    /// Lets a `Terminating` namespace go: its objects are deleted (those with finalizers wait for
    /// them) and it is removed once empty. Returns false if no such namespace is terminating.
    pub fn finish_namespace_deletion(&self, namespace: &str) -> bool {
        let found = {
            let mut st = self.shared.lock();
            let found = st.release_namespace(namespace);
            st.run_controllers();
            found
        };
        self.after_change();
        found
    }

    /// What the fake helm-controller does from now on.
    pub fn set_helm_controller(&self, settings: HelmControllerSettings) {
        {
            let mut st = self.shared.lock();
            st.helm = settings;
            // Charts written while it was off are picked up now, as a controller starting would.
            let charts: Vec<Key> = st.of_kind("helm.cattle.io", "helmcharts").map(|(k, _)| k.clone()).collect();
            st.dirty.extend(charts);
            st.run_controllers();
        }
        self.after_change();
    }

    /// Marks a Job as succeeded (conditions `SuccessCriteriaMet` and `Complete`, `succeeded: 1`).
    /// For a `helm-install-<chart>` Job this is where the chart gets installed: if the target
    /// namespace is missing (and `createNamespace` is false) or terminating, the install fails as
    /// Helm would: the pod failure is counted (`status.failed`), the Job stays active (helm-controller
    /// sets `backoffLimit: 1000`), and the error is returned; call again once the namespace is
    /// there. Completing `helm-delete-<chart>` lets the HelmChart go. A finished Job is an error.
    pub fn complete_job(&self, namespace: &str, name: &str) -> Result<(), String> {
        let result = {
            let mut st = self.shared.lock();
            let key = Key::of("batch", "jobs", namespace, name);
            let r = st.complete_job(&key);
            st.run_controllers();
            r
        };
        self.after_change();
        result
    }

    /// Marks a Job as failed (conditions `FailureTarget` and `Failed`, reason
    /// `BackoffLimitExceeded`, with `message`).
    pub fn fail_job(&self, namespace: &str, name: &str, message: &str) -> Result<(), String> {
        let result = {
            let mut st = self.shared.lock();
            let key = Key::of("batch", "jobs", namespace, name);
            let r = st.fail_job(&key, message);
            st.run_controllers();
            r
        };
        self.after_change();
        result
    }

    /// Sets `status.readyReplicas` (and `availableReplicas`) of a StatefulSet to `spec.replicas`.
    pub fn make_statefulset_ready(&self, namespace: &str, name: &str) -> Result<(), String> {
        let result = {
            let mut st = self.shared.lock();
            let key = Key::of("apps", "statefulsets", namespace, name);
            let r = st.make_statefulset_ready(&key);
            st.run_controllers();
            r
        };
        self.after_change();
        result
    }

    fn after_change(&self) {
        let timers = std::mem::take(&mut self.shared.lock().timers);
        spawn_timers(&self.runtime, &self.shared, timers);
        self.shared.notify.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock already failed the test; the state is still readable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_timers(runtime: &Handle, shared: &Arc<Shared>, timers: Vec<(Duration, String)>) {
    for (delay, namespace) in timers {
        let shared = shared.clone();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let timers = {
                let mut st = shared.lock();
                st.release_namespace(&namespace);
                st.run_controllers();
                std::mem::take(&mut st.timers)
            };
            if !timers.is_empty() {
                spawn_timers(&Handle::current(), &shared, timers);
            }
            shared.notify.notify_waiters();
        });
    }
}

// =============================================================================================
// HTTP plumbing: a listener that can be closed, connections that can be cut
// =============================================================================================

struct Shared {
    state: Mutex<State>,
    /// Woken after every change, for watches.
    notify: Notify,
    down: AtomicBool,
    /// A second handle on every open connection's socket, to shut it down from outside.
    conns: Mutex<HashMap<u64, std::net::TcpStream>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn new(port: u16) -> Shared {
        Shared {
            state: Mutex::new(State::new(port)),
            notify: Notify::new(),
            down: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn close_connections(&self) {
        for (_, socket) in lock(&self.conns).drain() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.notify.notify_waiters();
    }
}

fn bind(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

fn spawn_server(runtime: &Handle, shared: Arc<Shared>, listener: TcpListener) -> JoinHandle<()> {
    let app = Router::new().fallback(handle).with_state(shared.clone());
    runtime.spawn(async move {
        let _ = axum::serve(TrackedListener { inner: listener, shared }, app).await;
    })
}

struct TrackedListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for TrackedListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.shared.down.load(Ordering::SeqCst) {
                        continue; // dropped: the peer sees the connection closed
                    }
                    if let Ok(io) = TrackedStream::new(stream, self.shared.clone()) {
                        return (io, addr);
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

struct TrackedStream {
    inner: TcpStream,
    id: u64,
    shared: Arc<Shared>,
}

impl TrackedStream {
    fn new(stream: TcpStream, shared: Arc<Shared>) -> io::Result<TrackedStream> {
        let std_stream = stream.into_std()?;
        let handle = std_stream.try_clone()?;
        let inner = TcpStream::from_std(std_stream)?;
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        lock(&shared.conns).insert(id, handle);
        Ok(TrackedStream { inner, id, shared })
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let req = Req::new(method, &uri, &headers, body);
    let (reply, warnings, timers) = {
        let mut st = shared.lock();
        let reply = st.serve(&req);
        (reply, std::mem::take(&mut st.warnings), std::mem::take(&mut st.timers))
    };
    spawn_timers(&Handle::current(), &shared, timers);
    shared.notify.notify_waiters();
    let mut response = match reply {
        Reply::Json { code, body, content_type } => {
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            build_response(code, content_type.unwrap_or("application/json"), Body::from(bytes))
        }
        Reply::Plain(code, text) => build_response(code, "text/plain; charset=utf-8", Body::from(text)),
        Reply::Watch(spec) => {
            build_response(200, "application/json", Body::from_stream(watch_stream(shared.clone(), *spec)))
        }
    };
    for warning in warnings {
        let text = format!("299 - {}", serde_json::to_string(&warning).unwrap_or_default());
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

fn build_response(code: u16, content_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    response
}

/// A parsed request.
struct Req {
    method: Method,
    path: String,
    query_string: String,
    query: HashMap<String, String>,
    content_type: String,
    accept: String,
    user_agent: String,
    body: Bytes,
}

impl Req {
    fn new(method: Method, uri: &Uri, headers: &HeaderMap, body: Bytes) -> Req {
        let text = |name: header::HeaderName| {
            headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default()
        };
        let query_string = uri.query().unwrap_or("").to_string();
        let mut query = HashMap::new();
        for pair in query_string.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            query.insert(percent_decode(k), percent_decode(v));
        }
        Req {
            method,
            path: uri.path().to_string(),
            query_string,
            query,
            content_type: text(header::CONTENT_TYPE),
            accept: text(header::ACCEPT),
            user_agent: text(header::USER_AGENT),
            body,
        }
    }

    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.q(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }

    /// The field manager: the `fieldManager` parameter, else the user agent up to its first '/'
    /// (what the API server does for non-apply requests).
    fn manager(&self) -> String {
        if let Some(m) = self.q("fieldManager") {
            return m.to_string();
        }
        self.user_agent.split('/').next().unwrap_or("").chars().take(128).collect()
    }

    fn media_type(&self) -> String {
        self.content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
    }
}

enum Reply {
    Json { code: u16, body: Value, content_type: Option<&'static str> },
    Plain(u16, String),
    Watch(Box<WatchSpec>),
}

impl Reply {
    fn ok(code: u16, body: Value) -> Reply {
        Reply::Json { code, body, content_type: None }
    }

    fn code(&self) -> u16 {
        match self {
            Reply::Json { code, .. } | Reply::Plain(code, _) => *code,
            Reply::Watch(_) => 200,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        if e.plain {
            return Reply::Plain(e.code, format!("{}\n", e.message));
        }
        Reply::ok(e.code, e.status_body())
    }
}

// =============================================================================================
// Errors: the Status envelope
// =============================================================================================

#[derive(Debug, Clone)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
    /// Answered as text, as the API server's mux does for paths it does not serve at all.
    plain: bool,
}

#[derive(Debug, Clone)]
struct Cause {
    reason: &'static str,
    message: String,
    field: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None, plain: false }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    fn status_body(&self) -> Value {
        let mut body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            body["details"] = details.clone();
        }
        body
    }

    fn object_details(def: &ResourceDef, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": def.plural});
        if !def.group.is_empty() {
            d["group"] = json!(def.group);
        }
        d
    }

    fn page_not_found() -> ApiError {
        ApiError { plain: true, ..ApiError::new(404, "NotFound", "404 page not found") }
    }

    fn no_such_resource() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", def.group_resource()))
            .with_details(Self::object_details(def, name))
    }

    fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
            .with_details(json!({"name": namespace, "kind": "namespaces"}))
    }

    fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", def.group_resource()))
            .with_details(Self::object_details(def, name))
    }

    fn modified(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
                 changes to the latest version and try again",
                def.group_resource()
            ),
        )
        .with_details(Self::object_details(def, name))
    }

    fn precondition(def: &ResourceDef, name: &str, what: &str, wanted: &str, actual: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what} in precondition: {wanted}, \
                 {what} in object meta: {actual}",
                def.group_resource()
            ),
        )
        .with_details(Self::object_details(def, name))
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
        Self::invalid_kind(&def.group_kind(), &def.group, &def.kind, name, causes)
    }

    fn invalid_kind(group_kind: &str, group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> ApiError {
        let list: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let joined = if list.len() == 1 { list[0].clone() } else { format!("[{}]", list.join(", ")) };
        let mut details = json!({
            "name": name, "kind": kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message,
                "field": c.field})).collect::<Vec<_>>(),
        });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        ApiError::new(422, "Invalid", format!("{group_kind} \"{name}\" is invalid: {joined}")).with_details(details)
    }

    fn terminating(def: &ResourceDef, name: &str, namespace: &str) -> ApiError {
        let mut details = Self::object_details(def, name);
        details["causes"] = json!([{
            "reason": "NamespaceTerminating",
            "message": format!("namespace {namespace} is being terminated"),
            "field": "metadata.namespace",
        }]);
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being \
                 terminated",
                def.group_resource()
            ),
        )
        .with_details(details)
    }

    /// The error a programmed fault answers with.
    fn injected(
        code: u16,
        verb: Verb,
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
        message: Option<&str>,
    ) -> ApiError {
        let gr = def.group_resource();
        let target = if name.is_empty() { gr.clone() } else { format!("{gr} \"{name}\"") };
        let mut e = match code {
            400 => ApiError::bad_request(format!("the server rejected our request for an unknown reason ({target})")),
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => {
                let scope = match namespace {
                    Some(ns) => format!("in the namespace \"{ns}\""),
                    None => "at the cluster scope".to_string(),
                };
                ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{target} is forbidden: User \"system:serviceaccount:kube-system:hexa-coordinator\" cannot {} \
                         resource \"{}\" in API group \"{}\" {scope}",
                        verb.as_str(),
                        def.plural,
                        def.group
                    ),
                )
                .with_details(Self::object_details(def, name))
            }
            404 => ApiError::not_found(def, name),
            409 if verb == Verb::Create => ApiError::already_exists(def, name),
            409 => ApiError::modified(def, name),
            410 => ApiError::new(410, "Expired", "too old resource version"),
            422 => ApiError::invalid(
                def,
                name,
                vec![Cause {
                    reason: "FieldValueInvalid",
                    message: "Invalid value: injected fault".into(),
                    field: "spec".into(),
                }],
            ),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            )
            .with_details(json!({"retryAfterSeconds": 1})),
            503 => ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            504 => ApiError::new(
                504,
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            _ => ApiError::new(code, "InternalError", "Internal error occurred: injected fault")
                .with_details(json!({"causes": [{"message": "injected fault"}]})),
        };
        if let Some(m) = message {
            e.message = m.to_string();
        }
        e
    }
}

// =============================================================================================
// State
// =============================================================================================

/// A field path: map keys from the object's root. Lists are atomic, so paths never go inside one.
type FieldPath = Vec<String>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    group: String,
    plural: String,
    /// Empty for cluster-scoped objects.
    namespace: String,
    name: String,
}

impl Key {
    fn new(def: &ResourceDef, namespace: &str, name: &str) -> Key {
        Key::of(&def.group, &def.plural, if def.namespaced { namespace } else { "" }, name)
    }

    fn of(group: &str, plural: &str, namespace: &str, name: &str) -> Key {
        Key { group: group.into(), plural: plural.into(), namespace: namespace.into(), name: name.into() }
    }

    fn namespace(name: &str) -> Key {
        Key::of("", "namespaces", "", name)
    }

    fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Which part of an object a request writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sub {
    Main,
    Status,
    Finalize,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Main => "",
            Sub::Status => "status",
            Sub::Finalize => "finalize",
        }
    }
}

/// One `metadata.managedFields` entry, with its field set kept as paths.
#[derive(Clone, Debug)]
struct ManagerEntry {
    manager: String,
    operation: Operation,
    subresource: &'static str,
    api_version: String,
    time: String,
    fields: BTreeSet<FieldPath>,
}

impl ManagerEntry {
    fn is(&self, manager: &str, operation: Operation, sub: Sub) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == sub.name()
    }

    fn same_as(&self, other: &ManagerEntry) -> bool {
        self.manager == other.manager
            && self.operation == other.operation
            && self.subresource == other.subresource
            && self.api_version == other.api_version
            && self.fields == other.fields
    }
}

fn same_managers(a: &[ManagerEntry], b: &[ManagerEntry]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
}

struct Stored {
    obj: Value,
    managers: Vec<ManagerEntry>,
}

struct Event {
    rv: u64,
    etype: &'static str,
    key: Key,
    obj: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// Who a create is recorded for.
enum Owner {
    Update(String),
    Apply(String, BTreeSet<FieldPath>),
}

enum Deleted {
    /// Still there, with a deletionTimestamp (finalizers, or a terminating namespace).
    Pending(Value),
    /// Gone; the last state.
    Gone(Value),
}

struct State {
    port: u16,
    rv: u64,
    seed: u64,
    resources: Vec<(ResourceDef, bool)>,
    objects: BTreeMap<Key, Stored>,
    events: VecDeque<Event>,
    /// Events with a resourceVersion up to this one have been dropped from `events`.
    events_floor: u64,
    faults: Vec<Fault>,
    fail_all: Option<u16>,
    latency: Duration,
    writes: u64,
    changes: u64,
    log: Vec<RequestRecord>,
    helm: HelmControllerSettings,
    ns_deletion: NamespaceDeletion,
    released_namespaces: BTreeSet<String>,
    /// Namespaces to release after a delay, spawned once the lock is let go.
    timers: Vec<(Duration, String)>,
    /// Objects changed since the controllers last looked.
    dirty: BTreeSet<Key>,
    crd: Result<Arc<CrdSchema>, String>,
    /// `Warning` headers for the request being served.
    warnings: Vec<String>,
}

impl State {
    fn new(port: u16) -> State {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x9e37_79b9)
            ^ ((port as u64) << 32)
            | 1;
        let mut st = State {
            port,
            rv: 0,
            seed,
            resources: builtin_resources().into_iter().map(|d| (d, true)).collect(),
            objects: BTreeMap::new(),
            events: VecDeque::new(),
            events_floor: 0,
            faults: Vec::new(),
            fail_all: None,
            latency: Duration::ZERO,
            writes: 0,
            changes: 0,
            log: Vec::new(),
            helm: HelmControllerSettings::default(),
            ns_deletion: NamespaceDeletion::Immediate,
            released_namespaces: BTreeSet::new(),
            timers: Vec::new(),
            dirty: BTreeSet::new(),
            crd: CrdSchema::load().map(Arc::new),
            warnings: Vec::new(),
        };
        let ns_def = st.def_of(&Key::namespace("default")).unwrap_or_else(|| builtin_resources().remove(0));
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            let _ = st.upsert(&ns_def, ns, "k3s");
        }
        st.dirty.clear();
        st
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uid(&mut self) -> String {
        let (a, b) = (self.rand(), self.rand());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// The stored objects of one resource, ordered by namespace and name.
    fn of_kind<'a>(&'a self, group: &'a str, plural: &'a str) -> impl Iterator<Item = (&'a Key, &'a Stored)> + 'a {
        self.objects
            .range(Key::of(group, plural, "", "")..)
            .take_while(move |(k, _)| k.group == group && k.plural == plural)
    }

    fn find_def(&self, name: &str) -> Option<ResourceDef> {
        self.resources.iter().find(|(d, _)| d.answers_to(name)).map(|(d, _)| d.clone())
    }

    fn def_of(&self, key: &Key) -> Option<ResourceDef> {
        self.resources.iter().find(|(d, _)| d.group == key.group && d.plural == key.plural).map(|(d, _)| d.clone())
    }

    // ----- serving ---------------------------------------------------------------------------

    fn serve(&mut self, req: &Req) -> Reply {
        self.warnings.clear();
        let rv_before = self.rv;
        if matches!(req.method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
            self.writes += 1;
        }
        let (reply, verb, resource) = match self.fail_all {
            Some(code) => (ApiError::server_wide(code).into(), None, String::new()),
            None => self.route(req),
        };
        let changed = self.rv != rv_before;
        if changed {
            self.changes += 1;
        }
        self.run_controllers();
        if self.log.len() < REQUEST_LOG {
            self.log.push(RequestRecord {
                method: req.method.to_string(),
                path: req.path.clone(),
                query: req.query_string.clone(),
                verb,
                resource,
                status: reply.code(),
                changed,
                warnings: self.warnings.clone(),
            });
        }
        reply
    }

    fn route(&mut self, req: &Req) -> (Reply, Option<Verb>, String) {
        let aggregated = req.accept.contains("as=APIGroupDiscoveryList");
        let reply = match parse_route(&req.path) {
            Route::Version => Reply::ok(200, version_document()),
            Route::CoreVersions if aggregated => self.aggregated_discovery(true),
            Route::CoreVersions => Reply::ok(
                200,
                json!({
                    "kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                        "serverAddress": format!("127.0.0.1:{}", self.port)}],
                }),
            ),
            Route::Groups if aggregated => self.aggregated_discovery(false),
            Route::Groups => Reply::ok(200, self.group_list()),
            Route::Group(group) => match self.group_document(&group) {
                Some(doc) => Reply::ok(200, doc),
                None => ApiError::page_not_found().into(),
            },
            Route::GroupVersion(group, version) => match self.resource_list(&group, &version) {
                Some(doc) => Reply::ok(200, doc),
                None => ApiError::page_not_found().into(),
            },
            Route::Resource(path) => return self.serve_resource(req, path),
            Route::Unknown => ApiError::page_not_found().into(),
        };
        (reply, None, String::new())
    }

    fn serve_resource(&mut self, req: &Req, path: ResourcePath) -> (Reply, Option<Verb>, String) {
        let plural = path.plural.clone();
        let served_gv = self.resources.iter().any(|(d, s)| *s && d.group == path.group && d.version == path.version);
        if !served_gv {
            return (ApiError::page_not_found().into(), None, plural);
        }
        let found = self
            .resources
            .iter()
            .find(|(d, s)| *s && d.group == path.group && d.version == path.version && d.plural == path.plural);
        let Some(def) = found.map(|(d, _)| d.clone()) else {
            return (ApiError::no_such_resource().into(), None, plural);
        };
        let named = path.name.is_some();
        let verb = match req.method {
            Method::GET if named => Verb::Get,
            Method::GET if req.flag("watch") => Verb::Watch,
            Method::GET => Verb::List,
            Method::POST if !named => Verb::Create,
            Method::PUT if named => Verb::Update,
            Method::PATCH if named => Verb::Patch,
            Method::DELETE if named => Verb::Delete,
            Method::DELETE => Verb::DeleteCollection,
            _ => return (method_not_allowed().into(), None, plural),
        };
        let scoped_ok = match (def.namespaced, path.namespace.is_some()) {
            (false, true) => false,
            (true, false) => matches!(verb, Verb::List | Verb::Watch),
            _ => true,
        };
        if !scoped_ok {
            return (ApiError::no_such_resource().into(), Some(verb), plural);
        }
        let sub = match path.sub.as_deref() {
            None => Sub::Main,
            Some("status") if def.status_subresource => Sub::Status,
            Some("finalize") if def.is_namespace() => Sub::Finalize,
            Some(_) => return (ApiError::no_such_resource().into(), Some(verb), plural),
        };
        let sub_ok = match sub {
            Sub::Main => true,
            Sub::Status => matches!(verb, Verb::Get | Verb::Update | Verb::Patch),
            Sub::Finalize => verb == Verb::Update,
        };
        if !sub_ok {
            return (method_not_allowed().into(), Some(verb), plural);
        }
        let namespace = path.namespace.clone().unwrap_or_default();
        let name = path.name.clone().unwrap_or_default();
        if let Some(e) = self.take_fault(verb, &def, path.namespace.as_deref(), &name) {
            return (e.into(), Some(verb), plural);
        }
        let result = match verb {
            Verb::Get => self.op_get(&def, &namespace, &name),
            Verb::List => self.op_list(&def, path.namespace.as_deref(), req),
            Verb::Watch => self.op_watch(&def, path.namespace.as_deref(), req),
            Verb::Create => self.op_create(&def, &namespace, req),
            Verb::Update => self.op_update(&def, &namespace, &name, sub, req),
            Verb::Patch => self.op_patch(&def, &namespace, &name, sub, req),
            Verb::Delete => self.op_delete(&def, &namespace, &name, req),
            Verb::DeleteCollection => self.op_delete_collection(&def, path.namespace.as_deref(), req),
            Verb::Any => Err(method_not_allowed()),
        };
        (result.unwrap_or_else(Reply::from), Some(verb), plural)
    }

    fn take_fault(&mut self, verb: Verb, def: &ResourceDef, namespace: Option<&str>, name: &str) -> Option<ApiError> {
        let index = self.faults.iter().position(|f| {
            f.count > 0
                && f.verb.matches(verb)
                && (f.resource == "*" || def.answers_to(&f.resource))
                && f.name.as_deref().is_none_or(|n| n == name)
        })?;
        let fault = &mut self.faults[index];
        fault.count -= 1;
        let (code, message) = (fault.status, fault.message.clone());
        if fault.count == 0 {
            self.faults.remove(index);
        }
        Some(ApiError::injected(code, verb, def, namespace, name, message.as_deref()))
    }

    // ----- reads -----------------------------------------------------------------------------

    fn op_get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Result<Reply, ApiError> {
        let stored = self.objects.get(&Key::new(def, namespace, name)).ok_or_else(|| ApiError::not_found(def, name))?;
        Ok(Reply::ok(200, stored.obj.clone()))
    }

    fn op_list(&self, def: &ResourceDef, namespace: Option<&str>, req: &Req) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let limit = req.q("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let after = match req.q("continue") {
            Some(token) => {
                Some(decode_continue(token).ok_or_else(|| ApiError::bad_request("continue key is not valid"))?)
            }
            None => None,
        };
        let matching: Vec<(&Key, &Stored)> = self
            .of_kind(&def.group, &def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(k, _)| after.as_ref().is_none_or(|(ns, n)| (&k.namespace, &k.name) > (ns, n)))
            .filter(|(_, s)| selector.matches(&s.obj))
            .collect();
        let mut metadata = json!({"resourceVersion": self.rv.to_string()});
        if matching.len() > limit {
            let last = matching[limit - 1].0;
            metadata["continue"] = json!(encode_continue(&last.namespace, &last.name));
            metadata["remainingItemCount"] = json!(matching.len() - limit);
        }
        let items: Vec<Value> = matching.iter().take(limit).map(|(_, s)| list_item(def, &s.obj)).collect();
        Ok(Reply::ok(
            200,
            json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": metadata,
                "items": items}),
        ))
    }

    // ----- create ----------------------------------------------------------------------------

    fn op_create(&mut self, def: &ResourceDef, namespace: &str, req: &Req) -> Result<Reply, ApiError> {
        let mut obj = parse_object(req)?;
        check_type_meta(def, &mut obj, false)?;
        check_namespace_matches(def, &mut obj, namespace)?;
        if meta_str(&obj, "name").is_none() {
            match meta_str(&obj, "generateName").map(str::to_string) {
                Some(prefix) => {
                    let suffix: String =
                        (0..5).map(|_| b"bcdfghjklmnpqrstvwxz2456789"[(self.rand() % 27) as usize] as char).collect();
                    set_meta(&mut obj, "name", json!(format!("{prefix}{suffix}")));
                }
                None => {
                    return Err(ApiError::invalid(
                        def,
                        "",
                        vec![Cause {
                            reason: "FieldValueRequired",
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
            }
        }
        let fv = field_validation(req)?;
        self.prune(def, &mut obj, fv)?;
        let created = self.create_object(def, namespace, obj, Owner::Update(req.manager()), req.dry_run(), false)?;
        Ok(Reply::ok(201, created))
    }

    /// Stores a new object. `obj` has been type-checked and pruned; its name is set.
    fn create_object(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        mut obj: Value,
        owner: Owner,
        dry_run: bool,
        keep_status: bool,
    ) -> Result<Value, ApiError> {
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = Key::new(def, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(def, &name));
        }
        if def.namespaced {
            self.check_namespace_open(def, &name, namespace)?;
        }
        clear_server_meta(&mut obj);
        if def.namespaced {
            set_meta(&mut obj, "namespace", json!(namespace));
        } else if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("namespace");
        }
        let is_node = def.group.is_empty() && def.plural == "nodes";
        if def.status_subresource && !keep_status && !is_node {
            remove_key(&mut obj, "status");
        }
        if def.is_namespace() {
            namespace_defaults(&mut obj, &name, None, Sub::Main);
        }
        self.apply_defaults(def, &mut obj);
        self.validate(def, None, &obj)?;
        let uid = self.uid();
        set_meta(&mut obj, "uid", json!(uid));
        set_meta(&mut obj, "creationTimestamp", json!(now_rfc3339()));
        if !def.group.is_empty() {
            set_meta(&mut obj, "generation", json!(1));
        }
        let (manager, operation, fields) = match owner {
            Owner::Update(m) => {
                let fields = owned_leaves(&obj, def, Sub::Main);
                (m, Operation::Update, fields)
            }
            Owner::Apply(m, fields) => (m, Operation::Apply, fields),
        };
        let mut managers = Vec::new();
        if !fields.is_empty() {
            managers.push(ManagerEntry {
                manager,
                operation,
                subresource: "",
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields,
            });
        }
        if dry_run {
            set_managed_fields(&mut obj, &managers);
            return Ok(obj);
        }
        Ok(self.commit(key, obj, managers, "ADDED"))
    }

    fn check_namespace_open(&self, def: &ResourceDef, name: &str, namespace: &str) -> Result<(), ApiError> {
        match self.objects.get(&Key::namespace(namespace)) {
            None => Err(ApiError::namespace_not_found(namespace)),
            Some(s) if is_deleting(&s.obj) => Err(ApiError::terminating(def, name, namespace)),
            Some(_) => Ok(()),
        }
    }

    // ----- update (PUT) and the writes that share its path -----------------------------------

    fn op_update(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let mut body = parse_object(req)?;
        check_type_meta(def, &mut body, false)?;
        check_name_matches(&mut body, name)?;
        check_namespace_matches(def, &mut body, namespace)?;
        let fv = field_validation(req)?;
        let key = Key::new(def, namespace, name);
        let old = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        check_resource_version(def, name, &body, &old)?;
        self.prune(def, &mut body, fv)?;
        let new = compose_update(def, sub, &old, body);
        let obj = self.update_object(def, &key, new, &req.manager(), sub, req.dry_run())?;
        Ok(Reply::ok(200, obj))
    }

    /// Writes `new` over the stored object as an `Update` operation by `manager`.
    fn update_object(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        mut new: Value,
        manager: &str,
        sub: Sub,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let stored = self.objects.get(key).ok_or_else(|| ApiError::not_found(def, &key.name))?;
        let (old, old_managers) = (stored.obj.clone(), stored.managers.clone());
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
        if def.is_namespace() {
            namespace_defaults(&mut new, &key.name, Some(&old), sub);
        }
        self.apply_defaults(def, &mut new);
        check_finalizers_while_deleting(def, &old, &new)?;
        self.validate(def, Some(&old), &new)?;
        bump_generation(def, &old, &mut new);
        let managers = ownership_after_update(def, &old, &new, old_managers.clone(), manager, sub);
        self.finish_write(def, key, &old, &old_managers, new, managers, (manager, Operation::Update, sub), dry_run)
    }

    /// Commits a write unless it changes nothing; removes the object when it is being deleted
    /// and its last finalizer went.
    #[allow(clippy::too_many_arguments)]
    fn finish_write(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        old: &Value,
        old_managers: &[ManagerEntry],
        mut new: Value,
        mut managers: Vec<ManagerEntry>,
        writer: (&str, Operation, Sub),
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if content(old) == content(&new) && same_managers(old_managers, &managers) {
            return Ok(old.clone());
        }
        let now = now_rfc3339();
        for entry in managers.iter_mut().filter(|e| e.is(writer.0, writer.1, writer.2)) {
            entry.time = now.clone();
        }
        if dry_run {
            set_managed_fields(&mut new, &managers);
            if let Some(rv) = old.pointer("/metadata/resourceVersion") {
                set_meta(&mut new, "resourceVersion", rv.clone());
            }
            return Ok(new);
        }
        let obj = self.commit(key.clone(), new, managers, "MODIFIED");
        if is_deleting(&obj) && finalizers(&obj).is_empty() && !def.is_namespace() {
            self.purge(key, false);
        }
        Ok(obj)
    }

    // ----- patch -----------------------------------------------------------------------------

    fn op_patch(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let media = req.media_type();
        if media == "application/apply-patch+yaml" {
            return self.op_apply(def, namespace, name, sub, req);
        }
        let json_patch = match media.as_str() {
            "application/merge-patch+json" => false,
            // Built-in kinds: approximated by a JSON merge patch (lists are replaced, not merged by key).
            "application/strategic-merge-patch+json" if !def.custom => false,
            "application/json-patch+json" => true,
            _ => return Err(unsupported_media_type()),
        };
        if req.q("force").is_some() {
            return Err(patch_options_invalid(
                "force",
                "FieldValueForbidden",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        let fv = field_validation(req)?;
        let key = Key::new(def, namespace, name);
        let old = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        let patch: Value = serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let mut patched = old.clone();
        if json_patch {
            apply_json_patch(&mut patched, &patch).map_err(|m| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {m}"),
                )
            })?;
        } else {
            if !patch.is_object() {
                return Err(ApiError::bad_request("error decoding patch: a merge patch must be a JSON object"));
            }
            merge_patch(&mut patched, &patch);
        }
        if meta_str(&patched, "resourceVersion") != meta_str(&old, "resourceVersion") {
            return Err(ApiError::modified(def, name));
        }
        if meta_str(&patched, "name") != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&patched, "name").unwrap_or("")
            )));
        }
        check_type_meta(def, &mut patched, false)?;
        self.prune(def, &mut patched, fv)?;
        let new = compose_update(def, sub, &old, patched);
        let obj = self.update_object(def, &key, new, &req.manager(), sub, req.dry_run())?;
        Ok(Reply::ok(200, obj))
    }

    /// Server-side apply.
    fn op_apply(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let Some(manager) = req.q("fieldManager").map(str::to_string) else {
            return Err(patch_options_invalid(
                "fieldManager",
                "FieldValueRequired",
                "Required value: is required for apply patch",
            ));
        };
        let mut config = parse_object(req)?;
        check_type_meta(def, &mut config, true)?;
        check_name_matches(&mut config, name)?;
        check_namespace_matches(def, &mut config, namespace)?;
        let fv = field_validation(req)?;
        strip_nulls(&mut config);
        self.prune(def, &mut config, fv)?;
        let key = Key::new(def, namespace, name);
        let existing = self.objects.get(&key).map(|s| (s.obj.clone(), s.managers.clone()));
        if let Some(wanted) = meta_str(&config, "resourceVersion") {
            let current = existing.as_ref().and_then(|(o, _)| meta_str(o, "resourceVersion"));
            if current != Some(wanted) {
                return Err(ApiError::modified(def, name));
            }
        }
        let config = scope_config(def, sub, config);
        let fields = owned_leaves(&config, def, sub);
        let Some((live, managers)) = existing else {
            if sub != Sub::Main {
                return Err(ApiError::not_found(def, name));
            }
            let mut config = config;
            config["apiVersion"] = json!(def.api_version());
            config["kind"] = json!(def.kind);
            set_meta(&mut config, "name", json!(name));
            let created =
                self.create_object(def, namespace, config, Owner::Apply(manager, fields), req.dry_run(), false)?;
            return Ok(Reply::ok(201, created));
        };

        let mut merged = live.clone();
        apply_merge(&mut merged, &config);
        let previous = managers
            .iter()
            .find(|e| e.is(&manager, Operation::Apply, sub))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        for dropped in previous.difference(&fields) {
            let kept_by_other = managers
                .iter()
                .filter(|e| !e.is(&manager, Operation::Apply, sub))
                .any(|e| e.fields.iter().any(|q| q.starts_with(dropped)));
            if !kept_by_other {
                remove_path(&mut merged, dropped);
            }
        }
        if def.is_namespace() {
            namespace_defaults(&mut merged, name, Some(&live), sub);
        }
        self.apply_defaults(def, &mut merged);

        let conflicts: Vec<(usize, FieldPath)> = managers
            .iter()
            .enumerate()
            .filter(|(_, e)| e.manager != manager)
            .flat_map(|(i, e)| e.fields.iter().map(move |p| (i, p)))
            .filter(|(_, p)| get_path(&live, p) != get_path(&merged, p))
            .map(|(i, p)| (i, p.clone()))
            .collect();
        let mut managers_after = managers.clone();
        if !conflicts.is_empty() {
            if !req.flag("force") {
                return Err(conflict_error(&managers, &conflicts));
            }
            for (i, p) in &conflicts {
                managers_after[*i].fields.retain(|q| !overlaps(q, p));
            }
        }
        match managers_after.iter_mut().find(|e| e.is(&manager, Operation::Apply, sub)) {
            Some(entry) => {
                entry.fields = fields;
                entry.api_version = def.api_version();
            }
            None => managers_after.push(ManagerEntry {
                manager: manager.clone(),
                operation: Operation::Apply,
                subresource: sub.name(),
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields,
            }),
        }
        retain_existing(&mut managers_after, &merged);
        check_finalizers_while_deleting(def, &live, &merged)?;
        self.validate(def, Some(&live), &merged)?;
        bump_generation(def, &live, &mut merged);
        let obj = self.finish_write(
            def,
            &key,
            &live,
            &managers,
            merged,
            managers_after,
            (&manager, Operation::Apply, sub),
            req.dry_run(),
        )?;
        Ok(Reply::ok(200, obj))
    }

    // ----- delete ----------------------------------------------------------------------------

    fn op_delete(&mut self, def: &ResourceDef, namespace: &str, name: &str, req: &Req) -> Result<Reply, ApiError> {
        let opts: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
        };
        let propagation = opts
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or(req.q("propagationPolicy"))
            .unwrap_or("Background");
        let orphan = propagation == "Orphan" || opts.get("orphanDependents") == Some(&json!(true));
        let dry_run =
            req.dry_run() || opts.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|v| v == "All"));
        let key = Key::new(def, namespace, name);
        let obj = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(pre) = opts.get("preconditions") {
            for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(wanted) = pre.get(field).and_then(Value::as_str) {
                    let actual = meta_str(&obj, field).unwrap_or("");
                    if wanted != actual {
                        return Err(ApiError::precondition(def, name, what, wanted, actual));
                    }
                }
            }
        }
        if def.is_namespace() {
            if matches!(name, "default" | "kube-system" | "kube-public") {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
                )
                .with_details(ApiError::object_details(def, name)));
            }
            if is_deleting(&obj) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on namespaces \"{name}\": The system is ensuring all content is \
                         removed from this namespace.  Upon completion, this namespace will automatically be purged by \
                         the system."
                    ),
                )
                .with_details(ApiError::object_details(def, name)));
            }
        }
        if dry_run {
            return Ok(Reply::ok(200, obj));
        }
        match self.delete_object(&key, orphan) {
            Some(Deleted::Pending(obj)) => Ok(Reply::ok(200, obj)),
            Some(Deleted::Gone(obj)) if def.custom || def.is_namespace() => Ok(Reply::ok(200, obj)),
            Some(Deleted::Gone(obj)) => {
                let mut details = json!({"name": name, "kind": def.plural, "uid": meta_str(&obj, "uid").unwrap_or("")});
                if !def.group.is_empty() {
                    details["group"] = json!(def.group);
                }
                Ok(Reply::ok(
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": details}),
                ))
            }
            None => Err(ApiError::not_found(def, name)),
        }
    }

    fn op_delete_collection(
        &mut self,
        def: &ResourceDef,
        namespace: Option<&str>,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let keys: Vec<Key> = self
            .of_kind(&def.group, &def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(_, s)| selector.matches(&s.obj))
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for key in keys {
            if def.is_namespace() && matches!(key.name.as_str(), "default" | "kube-system" | "kube-public") {
                continue;
            }
            if req.dry_run() {
                items.extend(self.objects.get(&key).map(|s| list_item(def, &s.obj)));
                continue;
            }
            match self.delete_object(&key, false) {
                Some(Deleted::Pending(obj) | Deleted::Gone(obj)) => items.push(list_item(def, &obj)),
                None => {}
            }
        }
        Ok(Reply::ok(
            200,
            json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(),
                   "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
        ))
    }

    /// Deletes as the API server does: an object with finalizers (or a namespace) gets a
    /// deletionTimestamp and stays; otherwise it goes, and its dependents (by ownerReferences)
    /// go too, or are orphaned.
    fn delete_object(&mut self, key: &Key, orphan: bool) -> Option<Deleted> {
        let (obj, managers) = self.objects.get(key).map(|s| (s.obj.clone(), s.managers.clone()))?;
        if is_deleting(&obj) {
            return Some(Deleted::Pending(obj));
        }
        if key.is_namespace() {
            let mut new = obj;
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            new["status"] = json!({"phase": "Terminating"});
            let committed = self.commit(key.clone(), new, managers, "MODIFIED");
            if let NamespaceDeletion::After(delay) = self.ns_deletion {
                self.timers.push((delay, key.name.clone()));
            }
            return Some(Deleted::Pending(committed));
        }
        if !finalizers(&obj).is_empty() {
            let mut new = obj;
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            return Some(Deleted::Pending(self.commit(key.clone(), new, managers, "MODIFIED")));
        }
        self.purge(key, orphan).map(Deleted::Gone)
    }

    /// Removes an object now, then its dependents (garbage collection by ownerReferences).
    fn purge(&mut self, key: &Key, orphan: bool) -> Option<Value> {
        let stored = self.objects.remove(key)?;
        let mut obj = stored.obj;
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        self.push_event("DELETED", key, &obj);
        self.dirty.insert(key.clone());
        if key.is_namespace() {
            self.released_namespaces.remove(&key.name);
        }
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, s)| {
                s.obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(&uid)))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in dependents {
            if orphan {
                self.internal_update(&dependent, "kube-controller-manager", Sub::Main, |o| {
                    if let Some(refs) = o.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&uid));
                    }
                });
            } else {
                self.delete_object(&dependent, false);
            }
        }
        Some(obj)
    }

    // ----- storage ---------------------------------------------------------------------------

    fn commit(&mut self, key: Key, mut obj: Value, managers: Vec<ManagerEntry>, etype: &'static str) -> Value {
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        set_managed_fields(&mut obj, &managers);
        self.push_event(etype, &key, &obj);
        self.dirty.insert(key.clone());
        self.objects.insert(key, Stored { obj: obj.clone(), managers });
        obj
    }

    fn push_event(&mut self, etype: &'static str, key: &Key, obj: &Value) {
        self.events.push_back(Event { rv: self.rv, etype, key: key.clone(), obj: obj.clone() });
        while self.events.len() > EVENT_HISTORY {
            if let Some(old) = self.events.pop_front() {
                self.events_floor = old.rv;
            }
        }
    }

    /// A write by a controller (an `Update` by `manager`), skipping validation errors.
    fn internal_update(
        &mut self,
        key: &Key,
        manager: &str,
        sub: Sub,
        change: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let def = self.def_of(key)?;
        let mut new = self.objects.get(key)?.obj.clone();
        change(&mut new);
        self.update_object(&def, key, new, manager, sub, false).ok()
    }

    /// Create or replace for tests and for the fake controllers; status is taken as given.
    fn upsert(&mut self, def: &ResourceDef, mut obj: Value, manager: &str) -> Result<Value, ApiError> {
        check_type_meta(def, &mut obj, false)?;
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let namespace =
            if def.namespaced { meta_str(&obj, "namespace").unwrap_or("default").to_string() } else { String::new() };
        let key = Key::new(def, &namespace, &name);
        match self.objects.get(&key).map(|s| s.obj.clone()) {
            None => self.create_object(def, &namespace, obj, Owner::Update(manager.to_string()), false, true),
            Some(old) => {
                copy_server_meta(&old, &mut obj);
                self.update_object(def, &key, obj, manager, Sub::Main, false)
            }
        }
    }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
}

fn unsupported_media_type() -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
    )
}

fn patch_options_invalid(field: &str, reason: &'static str, message: &str) -> ApiError {
    ApiError::invalid_kind(
        "PatchOptions.meta.k8s.io",
        "meta.k8s.io",
        "PatchOptions",
        "",
        vec![Cause { reason, message: message.to_string(), field: field.to_string() }],
    )
}

fn conflict_error(managers: &[ManagerEntry], conflicts: &[(usize, FieldPath)]) -> ApiError {
    let mut by_manager: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, p) in conflicts {
        by_manager.entry(*i).or_default().push(dotted(p));
    }
    let mut parts = Vec::new();
    let mut causes = Vec::new();
    for (i, paths) in &by_manager {
        let e = &managers[*i];
        let with = format!("\"{}\" using {}", e.manager, e.api_version);
        if paths.len() == 1 {
            parts.push(format!("conflict with {with}: {}", paths[0]));
        } else {
            parts.push(format!("conflicts with {with}:\n- {}", paths.join("\n- ")));
        }
        for p in paths {
            causes.push(
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with {with}"), "field": p}),
            );
        }
    }
    let n = conflicts.len();
    let plural = if n == 1 { "conflict" } else { "conflicts" };
    ApiError::new(409, "Conflict", format!("Apply failed with {n} {plural}: {}", parts.join("\n")))
        .with_details(json!({"causes": causes}))
}

impl ApiError {
    /// What every request gets while [`FakeKube::fail_all`] is set.
    fn server_wide(code: u16) -> ApiError {
        match code {
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => ApiError::new(403, "Forbidden", "forbidden: User \"system:anonymous\" cannot get path \"/\""),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            503 => ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            504 => ApiError::new(504, "Timeout", "the server was unable to return a response in the time allotted"),
            _ => ApiError::new(code, "InternalError", "Internal error occurred: injected fault")
                .with_details(json!({"causes": [{"message": "injected fault"}]})),
        }
    }
}

// =============================================================================================
// Controllers: helm-controller, the Job and StatefulSet controllers, the namespace controller
// =============================================================================================

impl State {
    /// Lets the controllers react to what changed, until nothing more does.
    fn run_controllers(&mut self) {
        for _ in 0..100 {
            let dirty = std::mem::take(&mut self.dirty);
            if dirty.is_empty() {
                return;
            }
            let mut charts = BTreeSet::new();
            let mut namespaces = BTreeSet::new();
            for key in &dirty {
                if key.group == "helm.cattle.io" && key.plural == "helmcharts" {
                    charts.insert(key.clone());
                }
                if key.group == "batch" && key.plural == "jobs" {
                    let chart = key.name.strip_prefix("helm-install-").or(key.name.strip_prefix("helm-delete-"));
                    if let Some(chart) = chart {
                        charts.insert(Key::of("helm.cattle.io", "helmcharts", &key.namespace, chart));
                    }
                }
                if key.is_namespace() {
                    namespaces.insert(key.name.clone());
                } else if !key.namespace.is_empty() {
                    namespaces.insert(key.namespace.clone());
                }
            }
            if self.helm.enabled && self.helm.complete_install {
                // Install pods that failed for want of their namespace succeed once it exists.
                for ns in namespaces.iter().filter(|ns| self.objects.contains_key(&Key::namespace(ns))) {
                    charts.extend(self.charts_waiting_for(ns));
                }
            }
            for chart in charts {
                self.reconcile_chart(&chart);
            }
            for namespace in namespaces {
                self.reconcile_namespace(&namespace);
            }
        }
    }

    /// helm-controller's OnChange and OnRemove for one HelmChart.
    fn reconcile_chart(&mut self, key: &Key) {
        if !self.helm.enabled {
            return;
        }
        let Some(chart) = self.objects.get(key).map(|s| s.obj.clone()) else { return };
        let spec_str = |field: &str| chart.pointer(&format!("/spec/{field}")).and_then(Value::as_str).unwrap_or("");
        if spec_str("chart").is_empty() && spec_str("chartContent").is_empty() {
            return;
        }
        let annotations = chart.pointer("/metadata/annotations");
        if annotations.and_then(|a| a.get(HELM_UNMANAGED_ANNOTATION)).is_some() {
            return;
        }
        match annotations.and_then(|a| a.get(HELM_MANAGED_BY_ANNOTATION)).and_then(Value::as_str) {
            None => {
                // Claim it; the update brings the chart back here.
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                    set_map_entry(
                        o,
                        &["metadata", "annotations"],
                        HELM_MANAGED_BY_ANNOTATION,
                        json!(HELM_CONTROLLER_MANAGER),
                    );
                });
                return;
            }
            Some(HELM_CONTROLLER_MANAGER) => {}
            Some(_) => return,
        }
        let install_key = Key::of("batch", "jobs", &key.namespace, &format!("helm-install-{}", key.name));
        let delete_key = Key::of("batch", "jobs", &key.namespace, &format!("helm-delete-{}", key.name));
        let has_finalizer = finalizers(&chart).iter().any(|f| f == HELM_CHART_FINALIZER);

        if !is_deleting(&chart) {
            if !has_finalizer {
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                    let list =
                        o["metadata"].as_object_mut().map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
                    if let Some(Value::Array(list)) = list {
                        list.push(json!(HELM_CHART_FINALIZER));
                    }
                });
                return;
            }
            let desired = helm_job(&chart, "install");
            let current = self.objects.get(&install_key).map(|s| s.obj["spec"].clone());
            if current.as_ref() != Some(&desired["spec"]) {
                // Jobs are immutable: helm-controller's patcher deletes the Job and creates it anew.
                if current.is_some() {
                    self.purge(&install_key, false);
                }
                if self.create_job(desired) && self.helm.complete_install {
                    let _ = self.complete_job(&install_key);
                }
            } else if self.helm.complete_install && self.job(&install_key).is_ok() {
                let target = target_namespace(&chart);
                let open = self.objects.get(&Key::namespace(&target)).is_some_and(|s| !is_deleting(&s.obj));
                if open {
                    let _ = self.complete_job(&install_key);
                }
            }
            let job_name = install_key.name.clone();
            let status = json!({
                "jobName": job_name,
                "conditions": [
                    {"type": "JobCreated", "status": "True", "reason": "Job created",
                     "message": format!("Applying HelmChart using Job {}/{job_name}", key.namespace)},
                    {"type": "Failed", "status": "False"},
                ],
            });
            if chart.get("status") != Some(&status) {
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Status, |o| o["status"] = status);
            }
            return;
        }

        if !has_finalizer {
            return;
        }
        if self.objects.contains_key(&install_key) {
            self.purge(&install_key, false);
        }
        if !self.objects.contains_key(&delete_key)
            && self.create_job(helm_job(&chart, "delete"))
            && self.helm.complete_delete
        {
            let _ = self.complete_job(&delete_key);
        }
        let succeeded = self
            .objects
            .get(&delete_key)
            .and_then(|s| s.obj.pointer("/status/succeeded"))
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 0);
        if succeeded {
            self.helm_uninstall(&chart);
            self.purge(&delete_key, false);
            self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                if let Some(list) = o.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
                    list.retain(|f| f != HELM_CHART_FINALIZER);
                }
            });
        }
    }

    /// Creates a Job as helm-controller does, and starts it as the Job controller would.
    fn create_job(&mut self, job: Value) -> bool {
        let Some(def) = self.def_of(&Key::of("batch", "jobs", "", "")) else { return false };
        let namespace = meta_str(&job, "namespace").unwrap_or_default().to_string();
        let Ok(created) =
            self.create_object(&def, &namespace, job, Owner::Update(HELM_CONTROLLER_MANAGER.into()), false, false)
        else {
            return false;
        };
        let key = Key::new(&def, &namespace, meta_str(&created, "name").unwrap_or_default());
        let now = now_rfc3339();
        self.internal_update(&key, "k3s", Sub::Status, |o| {
            o["status"] =
                json!({"active": 1, "ready": 0, "terminating": 0, "startTime": now, "uncountedTerminatedPods": {}});
        });
        true
    }

    fn complete_job(&mut self, key: &Key) -> Result<(), String> {
        let job = self.job(key)?;
        if key.name.starts_with("helm-install-") {
            let chart_name = job.pointer(&format!("/metadata/labels/{}", escape_pointer(HELM_CHART_LABEL)));
            let chart_name = chart_name.and_then(Value::as_str).unwrap_or(&key.name["helm-install-".len()..]);
            let chart_key = Key::of("helm.cattle.io", "helmcharts", &key.namespace, chart_name);
            if let Some(chart) = self.objects.get(&chart_key).map(|s| s.obj.clone())
                && let Err(message) = self.helm_install(&chart)
            {
                // The pod failed; with helm-controller's backoffLimit (1000) the Job stays active
                // and a new pod retries.
                self.internal_update(key, "k3s", Sub::Status, |o| {
                    let failed = o.pointer("/status/failed").and_then(Value::as_u64).unwrap_or(0);
                    o["status"]["failed"] = json!(failed + 1);
                });
                return Err(message);
            }
        }
        self.finish_job(key, true, "Reached expected number of succeeded pods");
        Ok(())
    }

    /// Charts targeting `namespace` whose install Job is still running.
    fn charts_waiting_for(&self, namespace: &str) -> Vec<Key> {
        self.of_kind("helm.cattle.io", "helmcharts")
            .filter(|(_, s)| s.obj.pointer("/spec/targetNamespace").and_then(Value::as_str) == Some(namespace))
            .filter(|(k, _)| {
                let job = Key::of("batch", "jobs", &k.namespace, &format!("helm-install-{}", k.name));
                self.job(&job).is_ok()
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn fail_job(&mut self, key: &Key, message: &str) -> Result<(), String> {
        self.job(key)?;
        self.finish_job(key, false, message);
        Ok(())
    }

    fn job(&self, key: &Key) -> Result<Value, String> {
        let job = self
            .objects
            .get(key)
            .map(|s| s.obj.clone())
            .ok_or_else(|| format!("Job {}/{} not found", key.namespace, key.name))?;
        let finished = job.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| matches!(c["type"].as_str(), Some("Complete" | "Failed")) && c["status"] == "True")
        });
        if finished {
            return Err(format!("Job {}/{} has already finished", key.namespace, key.name));
        }
        Ok(job)
    }

    fn finish_job(&mut self, key: &Key, success: bool, message: &str) {
        let now = now_rfc3339();
        let condition = |kind: &str, reason: &str| {
            json!({"type": kind, "status": "True", "reason": reason, "message": message,
                   "lastProbeTime": now, "lastTransitionTime": now})
        };
        self.internal_update(key, "k3s", Sub::Status, |o| {
            let start = o.pointer("/status/startTime").cloned().unwrap_or(json!(now));
            o["status"] = if success {
                json!({
                    "startTime": start, "completionTime": now, "succeeded": 1, "ready": 0, "terminating": 0,
                    "uncountedTerminatedPods": {},
                    "conditions": [condition("SuccessCriteriaMet", "CompletionsReached"),
                        condition("Complete", "CompletionsReached")],
                })
            } else {
                json!({
                    "startTime": start, "failed": 1, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
                    "conditions": [condition("FailureTarget", "BackoffLimitExceeded"),
                        condition("Failed", "BackoffLimitExceeded")],
                })
            };
        });
    }

    /// What `helm install/upgrade` of the vcluster chart leaves in the target namespace.
    fn helm_install(&mut self, chart: &Value) -> Result<(), String> {
        let release = meta_str(chart, "name").unwrap_or_default().to_string();
        let target = target_namespace(chart);
        let create_namespace = chart.pointer("/spec/createNamespace") == Some(&json!(true));
        match self.objects.get(&Key::namespace(&target)).map(|s| is_deleting(&s.obj)) {
            Some(false) => {}
            Some(true) => {
                return Err(format!(
                    "Error: INSTALLATION FAILED: create: failed to create: namespaces \"{target}\" is forbidden: unable \
                     to create new content in namespace {target} because it is being terminated"
                ));
            }
            None if create_namespace => {
                let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": target}});
                if let Some(def) = self.def_of(&Key::namespace(&target)) {
                    self.upsert(&def, ns, "helm").map_err(|e| e.message)?;
                }
            }
            None => {
                return Err(format!(
                    "Error: INSTALLATION FAILED: create: failed to create: namespaces \"{target}\" not found"
                ));
            }
        }
        if !self.helm.install_statefulset {
            return Ok(());
        }
        let replicas = values_replicas(chart);
        let version = chart.pointer("/spec/version").and_then(Value::as_str).unwrap_or("latest").to_string();
        let Some(def) = self.def_of(&Key::of("apps", "statefulsets", "", "")) else { return Ok(()) };
        let key = Key::new(&def, &target, &release);
        let selector = json!({"app": "vcluster", "release": release});
        let desired_spec = json!({
            "replicas": replicas,
            "serviceName": format!("{release}-headless"),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{"name": "syncer",
                    "image": format!("ghcr.io/loft-sh/vcluster-pro:{version}")}]},
            },
        });
        if self.objects.contains_key(&key) {
            self.internal_update(&key, "helm", Sub::Main, |o| o["spec"] = desired_spec);
        } else {
            let sts = json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {
                    "name": release, "namespace": target,
                    "labels": {"app": "vcluster", "release": release, "app.kubernetes.io/managed-by": "Helm"},
                    "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": target},
                },
                "spec": desired_spec,
            });
            self.create_object(&def, &target, sts, Owner::Update("helm".into()), false, false)
                .map_err(|e| e.message)?;
        }
        self.internal_update(&key, "k3s", Sub::Status, |o| {
            let generation = o.pointer("/metadata/generation").cloned().unwrap_or(json!(1));
            let ready = o.pointer("/status/readyReplicas").and_then(Value::as_u64).unwrap_or(0).min(replicas);
            let mut status = json!({
                "replicas": replicas, "availableReplicas": ready, "currentReplicas": replicas,
                "updatedReplicas": replicas, "observedGeneration": generation, "collisionCount": 0,
                "currentRevision": format!("{release}-{generation}"),
                    "updateRevision": format!("{release}-{generation}"),
            });
            if ready > 0 {
                status["readyReplicas"] = json!(ready);
            }
            o["status"] = status;
        });
        if self.helm.statefulset_ready {
            self.make_statefulset_ready(&key)?;
        }
        Ok(())
    }

    /// What `helm uninstall` removes: the release's StatefulSet.
    fn helm_uninstall(&mut self, chart: &Value) {
        let release = meta_str(chart, "name").unwrap_or_default();
        let key = Key::of("apps", "statefulsets", &target_namespace(chart), release);
        if self.objects.contains_key(&key) {
            self.purge(&key, false);
        }
    }

    fn make_statefulset_ready(&mut self, key: &Key) -> Result<(), String> {
        let sts = self
            .objects
            .get(key)
            .map(|s| s.obj.clone())
            .ok_or_else(|| format!("StatefulSet {}/{} not found", key.namespace, key.name))?;
        let replicas = sts.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1);
        self.internal_update(key, "k3s", Sub::Status, |o| {
            let generation = o.pointer("/metadata/generation").cloned().unwrap_or(json!(1));
            let status = o.as_object_mut().map(|m| m.entry("status").or_insert_with(|| json!({})));
            if let Some(Value::Object(status)) = status {
                for field in ["replicas", "availableReplicas", "currentReplicas", "updatedReplicas"] {
                    status.insert(field.into(), json!(replicas));
                }
                status.insert("observedGeneration".into(), generation);
                if replicas > 0 {
                    status.insert("readyReplicas".into(), json!(replicas));
                } else {
                    status.remove("readyReplicas");
                }
            }
        });
        Ok(())
    }

    fn release_namespace(&mut self, namespace: &str) -> bool {
        let key = Key::namespace(namespace);
        let terminating = self.objects.get(&key).is_some_and(|s| is_deleting(&s.obj));
        if terminating {
            self.released_namespaces.insert(namespace.to_string());
            self.dirty.insert(key);
        }
        terminating
    }

    /// The namespace controller: empties a terminating namespace, then removes it.
    fn reconcile_namespace(&mut self, namespace: &str) {
        let key = Key::namespace(namespace);
        let Some(ns) = self.objects.get(&key).map(|s| s.obj.clone()) else { return };
        if !is_deleting(&ns) {
            return;
        }
        if self.ns_deletion != NamespaceDeletion::Immediate && !self.released_namespaces.contains(namespace) {
            return;
        }
        let contents: Vec<Key> = self.objects.keys().filter(|k| k.namespace == namespace).cloned().collect();
        for content in &contents {
            self.delete_object(content, false);
        }
        if self.objects.keys().any(|k| k.namespace == namespace) {
            return; // objects with finalizers; back here when they change
        }
        let spec_finalizers = ns.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if spec_finalizers {
            // What the namespace controller does through /finalize.
            self.internal_update(&key, "k3s", Sub::Finalize, |o| o["spec"]["finalizers"] = json!([]));
        }
        let still_there = self.objects.get(&key).map(|s| s.obj.clone());
        if let Some(ns) = still_there
            && finalizers(&ns).is_empty()
        {
            self.purge(&key, false);
        }
    }
}

/// Where the chart's release goes: `spec.targetNamespace`, else the chart's own namespace.
fn target_namespace(chart: &Value) -> String {
    chart
        .pointer("/spec/targetNamespace")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .or(meta_str(chart, "namespace"))
        .unwrap_or("default")
        .to_string()
}

/// The Job helm-controller creates for `action` (`install` or `delete`).
fn helm_job(chart: &Value, action: &str) -> Value {
    let name = meta_str(chart, "name").unwrap_or_default();
    let namespace = meta_str(chart, "namespace").unwrap_or_default();
    let uid = meta_str(chart, "uid").unwrap_or_default();
    let spec = chart.get("spec").cloned().unwrap_or(json!({}));
    let text = |field: &str| spec.get(field).and_then(Value::as_str).unwrap_or("").to_string();
    let flag = |field: &str| spec.get(field) == Some(&json!(true));
    let target = if text("targetNamespace").is_empty() { namespace.to_string() } else { text("targetNamespace") };
    let chart_ref = if text("repo").is_empty() { text("chart") } else { format!("{name}/{}", text("chart")) };
    let mut args = vec![json!(action)];
    if action == "install" {
        if !text("targetNamespace").is_empty() {
            args.extend([json!("--namespace"), json!(text("targetNamespace"))]);
        }
        if flag("createNamespace") {
            args.push(json!("--create-namespace"));
        }
        if !text("version").is_empty() {
            args.extend([json!("--version"), json!(text("version"))]);
        }
        if let Some(set) = spec.get("set").and_then(Value::as_object) {
            for (k, v) in set {
                let value = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                args.extend([json!("--set"), json!(format!("{k}={value}"))]);
            }
        }
    }
    let failure_policy = if text("failurePolicy").is_empty() { "reinstall".to_string() } else { text("failurePolicy") };
    let env = |k: &str, v: String| json!({"name": k, "value": v});
    let mut envs = vec![
        env("NAME", name.to_string()),
        env("VERSION", text("version")),
        env("REPO", text("repo")),
        env("HELM_DRIVER", "secret".into()),
        env("CHART_NAMESPACE", namespace.to_string()),
        env("CHART", chart_ref),
        env("HELM_VERSION", text("helmVersion")),
        env("TARGET_NAMESPACE", target),
        env("AUTH_PASS_CREDENTIALS", flag("authPassCredentials").to_string()),
        env("INSECURE_SKIP_TLS_VERIFY", flag("insecureSkipTLSVerify").to_string()),
        env("PLAIN_HTTP", flag("plainHTTP").to_string()),
    ];
    if !text("timeout").is_empty() {
        envs.push(env("TIMEOUT", text("timeout")));
    }
    envs.push(env("FAILURE_POLICY", failure_policy));
    // As helm-controller's hashObjects: the data of the chart-content ConfigMap, then of the
    // chart-values Secret, keys sorted.
    let mut hasher = Sha256::new();
    if !text("chartContent").is_empty() {
        hasher.update(format!("{name}.tgz.base64"));
        hasher.update(text("chartContent"));
    }
    for (k, v) in [("ca-file.pem", text("repoCA")), ("values-01_HelmChart.yaml", text("valuesContent"))] {
        if !v.is_empty() {
            hasher.update(k);
            hasher.update(v);
        }
    }
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02X}")).collect();
    let image = if text("jobImage").trim().is_empty() {
        "rancher/klipper-helm:v0.9.8-build20250709".to_string()
    } else {
        text("jobImage").trim().to_string()
    };
    let backoff = spec.get("backOffLimit").cloned().unwrap_or(json!(1000));
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": format!("helm-{action}-{name}"), "namespace": namespace,
            "labels": {HELM_CHART_LABEL: name},
            "ownerReferences": [{"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "name": name, "uid": uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "backoffLimit": backoff, "completions": 1, "parallelism": 1,
            "template": {
                "metadata": {"annotations": {HELM_CONFIG_HASH_ANNOTATION: format!("SHA256={hash}")},
                    "labels": {HELM_CHART_LABEL: name}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "serviceAccountName": format!("helm-{name}"),
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [{"name": "helm", "image": image, "imagePullPolicy": "IfNotPresent", "args": args,
                        "env": envs}],
                },
            },
        },
    })
}

/// `controlPlane.statefulSet.highAvailability.replicas` from `spec.values` over `spec.valuesContent`.
fn values_replicas(chart: &Value) -> u64 {
    let pointer = "/controlPlane/statefulSet/highAvailability/replicas";
    let as_count = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    if let Some(n) = chart.pointer("/spec/values").and_then(|v| v.pointer(pointer)).and_then(as_count) {
        return n;
    }
    chart
        .pointer("/spec/valuesContent")
        .and_then(Value::as_str)
        .and_then(|text| serde_norway::from_str::<Value>(text).ok())
        .and_then(|values| values.pointer(pointer).and_then(as_count))
        .unwrap_or(1)
}

// =============================================================================================
// Field ownership and object surgery
// =============================================================================================

/// Metadata fields the server owns: never part of a field set, never taken from a request.
const SERVER_META: [&str; 8] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The leaf field paths of `obj` that a write to `sub` can own.
fn owned_leaves(obj: &Value, def: &ResourceDef, sub: Sub) -> BTreeSet<FieldPath> {
    let scoped = scope_config(def, sub, obj.clone());
    let mut out = BTreeSet::new();
    collect_leaves(&scoped, &mut Vec::new(), &mut out);
    out
}

/// The part of a request body a write to `sub` may set.
fn scope_config(def: &ResourceDef, sub: Sub, mut obj: Value) -> Value {
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in SERVER_META.iter().chain(&["name", "namespace"]) {
                meta.remove(*field);
            }
            if meta.is_empty() {
                map.remove("metadata");
            }
        }
        match sub {
            Sub::Main if def.status_subresource => {
                map.remove("status");
            }
            Sub::Main => {}
            Sub::Status => map.retain(|k, _| k == "status"),
            Sub::Finalize => {
                let finalizers = map.get("spec").and_then(|s| s.get("finalizers")).cloned();
                map.clear();
                if let Some(f) = finalizers {
                    map.insert("spec".into(), json!({"finalizers": f}));
                }
            }
        }
    }
    obj
}

fn collect_leaves(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                prefix.push(k.clone());
                collect_leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |node, k| node.as_object()?.get(k))
}

/// Removes the field, then any map it leaves empty on the way up.
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    let Some(map) = v.as_object_mut() else { return };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(child) = map.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            map.remove(first);
        }
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// `.metadata.labels.a`: how SSA names a field in conflicts.
fn dotted(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// Server-side apply's merge: maps merge key by key, everything else (lists included) is replaced.
fn apply_merge(live: &mut Value, config: &Value) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, cv) in c {
                match l.get_mut(k) {
                    Some(lv) if lv.is_object() && cv.is_object() => apply_merge(lv, cv),
                    _ => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
            }
        }
        (l, c) => *l = c.clone(),
    }
}

/// Ownership after an `Update`: the writer takes the fields whose value it changed.
fn ownership_after_update(
    def: &ResourceDef,
    old: &Value,
    new: &Value,
    mut managers: Vec<ManagerEntry>,
    manager: &str,
    sub: Sub,
) -> Vec<ManagerEntry> {
    let changed: BTreeSet<FieldPath> =
        owned_leaves(new, def, sub).into_iter().filter(|p| get_path(old, p) != get_path(new, p)).collect();
    for entry in managers.iter_mut().filter(|e| !e.is(manager, Operation::Update, sub)) {
        entry.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
    }
    if !changed.is_empty() {
        match managers.iter_mut().find(|e| e.is(manager, Operation::Update, sub)) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.api_version = def.api_version();
            }
            None => managers.push(ManagerEntry {
                manager: manager.to_string(),
                operation: Operation::Update,
                subresource: sub.name(),
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields: changed,
            }),
        }
    }
    retain_existing(&mut managers, new);
    managers
}

/// Drops owned paths that no longer exist, and entries left with none.
fn retain_existing(managers: &mut Vec<ManagerEntry>, obj: &Value) {
    for entry in managers.iter_mut() {
        entry.fields.retain(|p| get_path(obj, p).is_some());
    }
    managers.retain(|e| !e.fields.is_empty());
}

fn set_managed_fields(obj: &mut Value, managers: &[ManagerEntry]) {
    let entries: Vec<Value> = managers
        .iter()
        .map(|e| {
            let mut fields = Map::new();
            for path in &e.fields {
                let mut node = &mut fields;
                for k in path {
                    let child = node.entry(format!("f:{k}")).or_insert_with(|| json!({}));
                    if !child.is_object() {
                        *child = json!({});
                    }
                    let Some(map) = child.as_object_mut() else { break };
                    node = map;
                }
            }
            let mut entry = json!({
                "manager": e.manager, "operation": e.operation.as_str(), "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": fields,
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = json!(e.subresource);
            }
            entry
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// The object without the fields every write changes.
fn content(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(meta) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    c
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(map) = c.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    c
}

fn bump_generation(def: &ResourceDef, old: &Value, new: &mut Value) {
    if def.group.is_empty() {
        return;
    }
    let generation = old.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(1);
    let next = if spec_part(old) == spec_part(new) { generation } else { generation + 1 };
    set_meta(new, "generation", json!(next));
}

/// Builds the object a PUT (or a non-apply patch) to `sub` asks for.
fn compose_update(def: &ResourceDef, sub: Sub, old: &Value, body: Value) -> Value {
    match sub {
        Sub::Main => {
            let mut new = body;
            copy_server_meta(old, &mut new);
            if def.status_subresource {
                match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => remove_key(&mut new, "status"),
                }
            }
            new
        }
        Sub::Status => {
            let mut new = old.clone();
            match body.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => remove_key(&mut new, "status"),
            }
            new
        }
        Sub::Finalize => {
            let mut new = old.clone();
            let finalizers = body.pointer("/spec/finalizers").cloned().unwrap_or(json!([]));
            if !new.get("spec").is_some_and(Value::is_object) {
                new["spec"] = json!({});
            }
            new["spec"]["finalizers"] = finalizers;
            new
        }
    }
}

fn copy_server_meta(old: &Value, new: &mut Value) {
    for field in
        ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "namespace"]
    {
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => set_meta(new, field, v.clone()),
            None => {
                if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove(field);
                }
            }
        }
    }
}

fn clear_server_meta(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in SERVER_META {
            meta.remove(field);
        }
    }
}

/// Namespaces: the immutable name label, the `kubernetes` finalizer and the phase are the server's;
/// `spec.finalizers` only changes through `/finalize`.
fn namespace_defaults(obj: &mut Value, name: &str, old: Option<&Value>, sub: Sub) {
    set_map_entry(obj, &["metadata", "labels"], "kubernetes.io/metadata.name", json!(name));
    match old {
        None => {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            if obj["spec"].get("finalizers").is_none() {
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            obj["status"] = json!({"phase": "Active"});
        }
        Some(old) => {
            if sub != Sub::Finalize {
                match old.get("spec") {
                    Some(spec) => obj["spec"] = spec.clone(),
                    None => remove_key(obj, "spec"),
                }
            }
            if sub != Sub::Status
                && let Some(status) = old.get("status")
            {
                obj["status"] = status.clone();
            }
        }
    }
}

fn check_finalizers_while_deleting(def: &ResourceDef, old: &Value, new: &Value) -> Result<(), ApiError> {
    if !is_deleting(old) {
        return Ok(());
    }
    let before = finalizers(old);
    let added: Vec<String> = finalizers(new).into_iter().filter(|f| !before.contains(f)).collect();
    if added.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        def,
        meta_str(old, "name").unwrap_or(""),
        vec![Cause {
            reason: "FieldValueForbidden",
            message: format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
            ),
            field: "metadata.finalizers".into(),
        }],
    ))
}

fn check_resource_version(def: &ResourceDef, name: &str, body: &Value, old: &Value) -> Result<(), ApiError> {
    match meta_str(body, "resourceVersion") {
        Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => Err(ApiError::modified(def, name)),
        _ => Ok(()),
    }
}

fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str().filter(|s| !s.is_empty())
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

/// Sets `key` in the map at `path`, creating the maps on the way.
fn set_map_entry(obj: &mut Value, path: &[&str], key: &str, value: Value) {
    let mut node = obj;
    for p in path {
        if !node.get(*p).is_some_and(Value::is_object) {
            node[*p] = json!({});
        }
        node = &mut node[*p];
    }
    node[key] = value;
}

fn remove_key(obj: &mut Value, key: &str) {
    if let Some(map) = obj.as_object_mut() {
        map.remove(key);
    }
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, child| !child.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn list_item(def: &ResourceDef, obj: &Value) -> Value {
    let mut item = obj.clone();
    if !def.custom
        && let Some(map) = item.as_object_mut()
    {
        // Typed lists from the API server leave these out of their items.
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

// =============================================================================================
// Validation: names, labels, taints, and the HelmChart CRD schema
// =============================================================================================

/// The HelmChart CRD's `openAPIV3Schema`, compiled once per process.
struct CrdSchema {
    schema: Value,
    validator: jsonschema::Validator,
    /// Fields under `x-kubernetes-validations` transition rules that make them immutable.
    immutable: Vec<(FieldPath, String)>,
}

impl CrdSchema {
    fn load() -> Result<CrdSchema, String> {
        type Loaded = Result<(Value, Vec<(FieldPath, String)>), String>;
        static CRD: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
        let (schema, immutable) = CRD
            .get_or_init(|| {
                let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HELMCHART_CRD);
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                // serde_norway: the maintained fork of serde_yaml (archived), already the workspace's YAML crate.
                let crd: Value = serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                let schema = crd
                    .pointer("/spec/versions/0/schema/openAPIV3Schema")
                    .cloned()
                    .ok_or_else(|| format!("{}: no spec.versions[0].schema.openAPIV3Schema", path.display()))?;
                let mut immutable = Vec::new();
                collect_immutable(&schema, &mut Vec::new(), &mut immutable);
                Ok((schema, immutable))
            })
            .clone()?;
        // OpenAPI v3.0 schemas are JSON Schema draft 4 plus extensions (`x-kubernetes-*`), which
        // the validator ignores; the structural parts (pruning, defaults, transition rules) are
        // done here.
        let validator = jsonschema::draft4::new(&schema).map_err(|e| format!("HelmChart CRD schema: {e}"))?;
        Ok(CrdSchema { schema, validator, immutable })
    }

    fn causes(&self, old: Option<&Value>, obj: &Value) -> Vec<Cause> {
        let mut causes: Vec<Cause> = self.validator.iter_errors(obj).map(|e| schema_cause(&e)).collect();
        for (path, message) in &self.immutable {
            if let Some(before) = old.and_then(|o| get_path(o, path))
                && get_path(obj, path) != Some(before)
            {
                let field = dotted(path).trim_start_matches('.').to_string();
                let kind = json_type_name(get_path(obj, path).unwrap_or(&Value::Null));
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: \"{kind}\": {message}"),
                    field,
                });
            }
        }
        causes
    }
}

fn collect_immutable(schema: &Value, path: &mut Vec<String>, out: &mut Vec<(FieldPath, String)>) {
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        for rule in rules {
            let text = rule.get("rule").and_then(Value::as_str).unwrap_or("");
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            if compact == "!oldSelf.hasValue()||self==oldSelf.value()" || compact == "self==oldSelf" {
                let message = rule.get("message").and_then(Value::as_str).unwrap_or("Value is immutable");
                out.push((path.clone(), message.to_string()));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, child) in props {
            path.push(k.clone());
            collect_immutable(child, path, out);
            path.pop();
        }
    }
}

fn schema_cause(err: &jsonschema::ValidationError<'_>) -> Cause {
    use jsonschema::error::{TypeKind, ValidationErrorKind};
    let field = pointer_to_field(err.instance_path().as_str());
    let instance: &Value = err.instance();
    match err.kind() {
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => format!("{set:?}"),
            };
            let actual = json_type_name(instance);
            Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"{actual}\": {field} in body must be of type {expected}: \"{actual}\""
                ),
                field,
            }
        }
        ValidationErrorKind::Enum { options } => {
            let supported: Vec<String> =
                options.as_array().map(|o| o.iter().map(Value::to_string).collect()).unwrap_or_default();
            Cause {
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {instance}: supported values: {}", supported.join(", ")),
                field,
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().map(str::to_string).unwrap_or_else(|| property.to_string());
            let field = if field.is_empty() { name } else { format!("{field}.{name}") };
            Cause { reason: "FieldValueRequired", message: "Required value".into(), field }
        }
        _ => Cause { reason: "FieldValueInvalid", message: format!("Invalid value: {instance}: {err}"), field },
    }
}

/// `/spec/valuesSecrets/0/name` -> `spec.valuesSecrets[0].name`.
fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Drops fields the schema does not declare (what the API server does to custom resources),
/// collecting their paths.
fn prune_unknown(schema: &Value, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|e| e.is_object());
            if props.is_none() && extra.is_none() {
                return; // `type: object` alone, or preserve-unknown-fields: anything goes
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child_schema = props.and_then(|p| p.get(&k)).or(extra);
                match (child_schema, map.get_mut(&k)) {
                    (Some(s), Some(child)) => prune_unknown(s, child, &join(&k), unknown),
                    (None, _) if preserve => {}
                    (None, _) => {
                        unknown.push(join(&k));
                        map.remove(&k);
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_unknown(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in the schema's `default`s under objects that are present.
fn schema_defaults(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    if !map.contains_key(k)
                        && let Some(default) = s.get("default")
                    {
                        map.insert(k.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(k) {
                        schema_defaults(s, child);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|e| e.is_object()) {
                map.values_mut().for_each(|child| schema_defaults(extra, child));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items.iter_mut().for_each(|item| schema_defaults(item_schema, item));
            }
        }
        _ => {}
    }
}

impl State {
    fn crd(&self) -> Result<Arc<CrdSchema>, ApiError> {
        self.crd.clone().map_err(|m| {
            ApiError::new(
                500,
                "InternalError",
                format!("Internal error occurred: the fake API server has no HelmChart CRD: {m}"),
            )
        })
    }

    /// Drops undeclared fields of custom resources with a schema, as `fieldValidation` says.
    fn prune(&mut self, def: &ResourceDef, obj: &mut Value, fv: FieldValidation) -> Result<(), ApiError> {
        if !def.is_helmchart() {
            return Ok(());
        }
        let crd = self.crd()?;
        let mut unknown = Vec::new();
        prune_unknown(&crd.schema, obj, "", &mut unknown);
        let texts: Vec<String> = unknown.iter().map(|u| format!("unknown field \"{u}\"")).collect();
        match fv {
            _ if texts.is_empty() => Ok(()),
            FieldValidation::Strict => {
                Err(ApiError::bad_request(format!("strict decoding error: {}", texts.join(", "))))
            }
            FieldValidation::Warn => {
                self.warnings.extend(texts);
                Ok(())
            }
            FieldValidation::Ignore => Ok(()),
        }
    }

    fn apply_defaults(&self, def: &ResourceDef, obj: &mut Value) {
        if def.is_helmchart()
            && let Ok(crd) = &self.crd
        {
            schema_defaults(&crd.schema, obj);
        }
    }

    fn validate(&self, def: &ResourceDef, old: Option<&Value>, obj: &Value) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").unwrap_or("");
        let mut causes = Vec::new();
        let name_check =
            if def.is_namespace() || def.plural == "services" { dns_label(name) } else { dns_subdomain(name) };
        if let Err(m) = name_check {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {name:?}: {m}"),
                field: "metadata.name".into(),
            });
        }
        for (field, values_are_labels) in [("labels", true), ("annotations", false)] {
            let Some(map) = obj.pointer(&format!("/metadata/{field}")) else { continue };
            let Some(map) = map.as_object() else {
                return Err(ApiError::bad_request(format!(
                    "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type map[string]string",
                    json_type_name(map)
                )));
            };
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return Err(ApiError::bad_request(format!(
                        "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type string",
                        json_type_name(v)
                    )));
                };
                if let Err(m) = qualified_name(k) {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {k:?}: {m}"),
                        field: format!("metadata.{field}"),
                    });
                }
                if values_are_labels && let Err(m) = label_value(v) {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {v:?}: {m}"),
                        field: format!("metadata.{field}"),
                    });
                }
            }
        }
        for (i, f) in finalizers(obj).iter().enumerate() {
            if let Err(m) = qualified_name(f) {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {f:?}: {m}"),
                    field: format!("metadata.finalizers[{i}]"),
                });
            }
        }
        if def.group.is_empty() && def.plural == "nodes" {
            causes.extend(taint_causes(obj));
        }
        if def.is_helmchart() {
            causes.extend(self.crd()?.causes(old, obj));
        }
        if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(def, name, causes)) }
    }
}

fn taint_causes(node: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(taints) = node.pointer("/spec/taints").and_then(Value::as_array) else { return causes };
    let mut seen = BTreeSet::new();
    for (i, taint) in taints.iter().enumerate() {
        let field = |f: &str| format!("spec.taints[{i}].{f}");
        let key = taint.get("key").and_then(Value::as_str).unwrap_or("");
        let value = taint.get("value").and_then(Value::as_str).unwrap_or("");
        let effect = taint.get("effect").and_then(Value::as_str).unwrap_or("");
        if let Err(m) = qualified_name(key) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {key:?}: {m}"),
                field: field("key"),
            });
        }
        if let Err(m) = label_value(value) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {value:?}: {m}"),
                field: field("value"),
            });
        }
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {effect:?}: supported values: \"NoSchedule\", \"PreferNoSchedule\", \
                     \"NoExecute\""
                ),
                field: field("effect"),
            });
        }
        if !seen.insert((key.to_string(), effect.to_string())) {
            causes.push(Cause {
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {taint}: taints must be unique by key and effect pair"),
                field: format!("spec.taints[{i}]"),
            });
        }
    }
    causes
}

const DNS_LABEL_HELP: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and \
     must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is \
     '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS_SUBDOMAIN_HELP: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
     or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is \
     '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const NAME_PART_HELP: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end \
     with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is \
     '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_HELP: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or \
     '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex \
     used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn dns_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if is_dns_label(s) { Ok(()) } else { Err(DNS_LABEL_HELP.into()) }
}

fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.is_empty() && s.split('.').all(is_dns_label) { Ok(()) } else { Err(DNS_SUBDOMAIN_HELP.into()) }
}

fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key, or a finalizer: `[prefix/]name`.
fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        dns_subdomain(prefix).map_err(|m| format!("prefix part {m}"))?;
    }
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if is_name_part(name) { Ok(()) } else { Err(NAME_PART_HELP.into()) }
}

fn label_value(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if s.is_empty() || is_name_part(s) { Ok(()) } else { Err(LABEL_VALUE_HELP.into()) }
}

// =============================================================================================
// Selectors
// =============================================================================================

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default)]
struct Selector {
    labels: Vec<LabelReq>,
    /// (field, equal, value)
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    fn parse(req: &Req) -> Result<Selector, ApiError> {
        let labels = parse_label_selector(req.q("labelSelector").unwrap_or(""))
            .map_err(|m| ApiError::bad_request(format!("unable to parse requirement: {m}")))?;
        let fields = parse_field_selector(req.q("fieldSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
        Ok(Selector { labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::NotEq(k, v) => label(k) != Some(v),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(field, eq, value)| {
            let actual = match field.as_str() {
                "metadata.name" => meta_str(obj, "name").unwrap_or(""),
                _ => meta_str(obj, "namespace").unwrap_or(""),
            };
            (actual == value) == *eq
        });
        labels_ok && fields_ok
    }
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    let mut reqs = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let key_ok = |k: &str| qualified_name(k).map(|_| k.to_string()).map_err(|m| format!("{k:?}: {m}"));
        let req = if let Some(k) = part.strip_prefix('!') {
            LabelReq::NotExists(key_ok(k.trim())?)
        } else if let Some(open) = part.find('(') {
            let close = part.rfind(')').ok_or_else(|| format!("{part:?}: missing ')'"))?;
            let values: Vec<String> =
                part[open + 1..close].split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
            let head = part[..open].trim();
            if let Some(k) = head.strip_suffix("notin") {
                LabelReq::NotIn(key_ok(k.trim())?, values)
            } else if let Some(k) = head.strip_suffix("in") {
                LabelReq::In(key_ok(k.trim())?, values)
            } else {
                return Err(format!("{part:?}: unknown operator"));
            }
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelReq::NotEq(key_ok(k.trim())?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once("==") {
            LabelReq::Eq(key_ok(k.trim())?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once('=') {
            LabelReq::Eq(key_ok(k.trim())?, v.trim().to_string())
        } else {
            LabelReq::Exists(key_ok(part)?)
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = part.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = part.split_once('=') {
            (f, true, v)
        } else {
            return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
        };
        let field = field.trim();
        if field != "metadata.name" && field != "metadata.namespace" {
            return Err(format!("field label not supported: {field}"));
        }
        out.push((field.to_string(), eq, value.trim().to_string()));
    }
    Ok(out)
}

fn encode_continue(namespace: &str, name: &str) -> String {
    format!("{namespace}\u{0}{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    if token.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (ns, name) = text.split_once('\u{0}')?;
    Some((ns.to_string(), name.to_string()))
}

// =============================================================================================
// Watch
// =============================================================================================

struct WatchSpec {
    group: String,
    plural: String,
    namespace: Option<String>,
    selector: Selector,
    after_rv: u64,
    initial: String,
    expired: Option<String>,
    deadline: Instant,
    done: bool,
}

fn event_line(etype: &str, obj: &Value) -> String {
    let mut line = serde_json::to_string(&json!({"type": etype, "object": obj})).unwrap_or_default();
    line.push('\n');
    line
}

fn expired_line(rv: u64, floor: u64) -> String {
    let status = ApiError::new(410, "Expired", format!("too old resource version: {rv} ({floor})")).status_body();
    event_line("ERROR", &status)
}

impl State {
    fn op_watch(&self, def: &ResourceDef, namespace: Option<&str>, req: &Req) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let timeout = req.q("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
        let requested = match req.q("resourceVersion") {
            None => 0,
            Some(rv) => rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion: {rv:?} is not a valid resource version"))
            })?,
        };
        let send_initial = req.flag("sendInitialEvents");
        let mut spec = WatchSpec {
            group: def.group.clone(),
            plural: def.plural.clone(),
            namespace: namespace.map(str::to_string),
            selector,
            after_rv: requested,
            initial: String::new(),
            expired: None,
            deadline: Instant::now() + Duration::from_secs(timeout),
            done: false,
        };
        if requested == 0 || send_initial {
            // "Start at most recent": the current state as ADDED events, then what follows.
            for (key, stored) in &self.objects {
                if spec.wants(key, &stored.obj) {
                    spec.initial.push_str(&event_line("ADDED", &stored.obj));
                }
            }
            spec.after_rv = self.rv;
            if send_initial {
                let bookmark = json!({
                    "kind": def.kind, "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": self.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}},
                });
                spec.initial.push_str(&event_line("BOOKMARK", &bookmark));
            }
        } else if requested < self.events_floor {
            spec.expired = Some(expired_line(requested, self.events_floor));
        }
        Ok(Reply::Watch(Box::new(spec)))
    }
}

impl WatchSpec {
    fn wants(&self, key: &Key, obj: &Value) -> bool {
        key.group == self.group
            && key.plural == self.plural
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
            && self.selector.matches(obj)
    }
}

fn watch_stream(
    shared: Arc<Shared>,
    spec: WatchSpec,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold((shared, spec), |(shared, mut spec)| async move {
        if spec.done {
            return None;
        }
        if !spec.initial.is_empty() {
            let text = std::mem::take(&mut spec.initial);
            return Some((Ok(Bytes::from(text)), (shared, spec)));
        }
        if let Some(line) = spec.expired.take() {
            spec.done = true;
            return Some((Ok(Bytes::from(line)), (shared, spec)));
        }
        loop {
            if shared.down.load(Ordering::SeqCst) {
                return None;
            }
            let wake = shared.clone();
            let notified = wake.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let text = {
                let st = shared.lock();
                if spec.after_rv < st.events_floor {
                    spec.done = true;
                    expired_line(spec.after_rv, st.events_floor)
                } else {
                    let start = st.events.partition_point(|e| e.rv <= spec.after_rv);
                    let mut text = String::new();
                    for event in st.events.range(start..) {
                        if spec.wants(&event.key, &event.obj) {
                            text.push_str(&event_line(event.etype, &event.obj));
                        }
                    }
                    spec.after_rv = st.rv;
                    text
                }
            };
            if !text.is_empty() {
                return Some((Ok(Bytes::from(text)), (shared, spec)));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(spec.deadline.into()) => return None,
            }
        }
    })
}

// =============================================================================================
// Discovery
// =============================================================================================

fn version_document() -> Value {
    json!({
        "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
        "minCompatibilityMajor": "1", "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.5+k3s1", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-09-10T00:00:00Z", "goVersion": "go1.24.6",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

impl State {
    fn served(&self) -> impl Iterator<Item = &ResourceDef> {
        self.resources.iter().filter(|(_, s)| *s).map(|(d, _)| d)
    }

    fn versions_of(&self, group: &str) -> Vec<String> {
        let set: BTreeSet<String> = self.served().filter(|d| d.group == group).map(|d| d.version.clone()).collect();
        set.into_iter().collect()
    }

    fn group_entry(&self, group: &str) -> Option<Value> {
        let versions = self.versions_of(group);
        let first = versions.first()?;
        Some(json!({
            "name": group,
            "versions": versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"),
                "version": v})).collect::<Vec<_>>(),
            "preferredVersion": {"groupVersion": format!("{group}/{first}"), "version": first},
        }))
    }

    fn group_list(&self) -> Value {
        let groups: BTreeSet<String> = self.served().filter(|d| !d.group.is_empty()).map(|d| d.group.clone()).collect();
        let entries: Vec<Value> = groups.iter().filter_map(|g| self.group_entry(g)).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": entries})
    }

    fn group_document(&self, group: &str) -> Option<Value> {
        let mut doc = self.group_entry(group)?;
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        Some(doc)
    }

    fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let defs: Vec<&ResourceDef> = self.served().filter(|d| d.group == group && d.version == version).collect();
        if defs.is_empty() {
            return None;
        }
        let mut resources = Vec::new();
        for d in defs {
            let mut r = json!({"name": d.plural, "singularName": d.singular, "namespaced": d.namespaced, "kind": d.kind,
                "verbs": d.verbs()});
            if !d.short_names.is_empty() {
                r["shortNames"] = json!(d.short_names);
            }
            resources.push(r);
            if d.status_subresource {
                resources.push(
                    json!({"name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced,
                                      "kind": d.kind, "verbs": ["get", "patch", "update"]}),
                );
            }
            if d.is_namespace() {
                resources.push(json!({"name": "namespaces/finalize", "singularName": "", "namespaced": false,
                                      "kind": "Namespace", "verbs": ["update"]}));
            }
        }
        let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
    }

    /// `apidiscovery.k8s.io/v2`: `/api` (core only) or `/apis` (every other group).
    fn aggregated_discovery(&self, core: bool) -> Reply {
        let groups: BTreeSet<String> =
            self.served().filter(|d| d.group.is_empty() == core).map(|d| d.group.clone()).collect();
        let items: Vec<Value> = groups
            .iter()
            .map(|group| {
                let versions: Vec<Value> = self
                    .versions_of(group)
                    .iter()
                    .map(|version| {
                        let resources: Vec<Value> = self
                            .served()
                            .filter(|d| d.group == *group && d.version == *version)
                            .map(|d| {
                                let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
                                let mut subresources = Vec::new();
                                if d.status_subresource {
                                    subresources.push(json!({"subresource": "status", "responseKind": gvk,
                                        "verbs": ["get", "patch", "update"]}));
                                }
                                json!({
                                    "resource": d.plural, "responseKind": gvk, "singularResource": d.singular,
                                    "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                                    "verbs": d.verbs(), "shortNames": d.short_names, "subresources": subresources,
                                })
                            })
                            .collect();
                        json!({"version": version, "freshness": "Current", "resources": resources})
                    })
                    .collect();
                json!({"metadata": {"name": group}, "versions": versions})
            })
            .collect();
        Reply::Json {
            code: 200,
            body: json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
                "items": items}),
            content_type: Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
        }
    }
}

// =============================================================================================
// Request helpers
// =============================================================================================

struct ResourcePath {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    GroupVersion(String, String),
    Resource(ResourcePath),
    Unknown,
}

fn parse_route(path: &str) -> Route {
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::CoreVersions,
        ["api", v] => Route::GroupVersion(String::new(), v.to_string()),
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis"] => Route::Groups,
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::GroupVersion(g.to_string(), v.to_string()),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        _ => Route::Unknown,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let (plural, namespace, name, sub) = match rest {
        [p] => (*p, None, None, None),
        [p, n] => (*p, None, Some(*n), None),
        ["namespaces", ns, p] if *p != "status" && *p != "finalize" => (*p, Some(*ns), None, None),
        [p, n, s] => (*p, None, Some(*n), Some(*s)),
        ["namespaces", ns, p, n] => (*p, Some(*ns), Some(*n), None),
        ["namespaces", ns, p, n, s] => (*p, Some(*ns), Some(*n), Some(*s)),
        _ => return Route::Unknown,
    };
    Route::Resource(ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_object(req: &Req) -> Result<Value, ApiError> {
    let value: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(_) if req.media_type().contains("yaml") => serde_norway::from_str(&String::from_utf8_lossy(&req.body))
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        Err(e) => return Err(ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go value of type struct",
            json_type_name(&value)
        )));
    }
    Ok(value)
}

/// apiVersion and kind must be the resource's (they are filled in when missing, except for apply).
fn check_type_meta(def: &ResourceDef, obj: &mut Value, required: bool) -> Result<(), ApiError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    if required && (api_version.is_empty() || kind.is_empty()) {
        return Err(ApiError::bad_request(format!("invalid object type: {api_version}, Kind={kind}")));
    }
    if !api_version.is_empty() && api_version != def.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            def.api_version()
        )));
    }
    if !kind.is_empty() && kind != def.kind {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): kind {kind} does not match",
            def.kind
        )));
    }
    obj["apiVersion"] = json!(def.api_version());
    obj["kind"] = json!(def.kind);
    Ok(())
}

fn check_name_matches(obj: &mut Value, name: &str) -> Result<(), ApiError> {
    match meta_str(obj, "name") {
        Some(n) if n != name => Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        ))),
        _ => {
            set_meta(obj, "name", json!(name));
            Ok(())
        }
    }
}

fn check_namespace_matches(def: &ResourceDef, obj: &mut Value, namespace: &str) -> Result<(), ApiError> {
    if !def.namespaced {
        return Ok(());
    }
    match meta_str(obj, "namespace") {
        Some(ns) if ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            set_meta(obj, "namespace", json!(namespace));
            Ok(())
        }
    }
}

fn field_validation(req: &Req) -> Result<FieldValidation, ApiError> {
    match req.q("fieldValidation") {
        None | Some("Warn") => Ok(FieldValidation::Warn),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
        ))),
    }
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target_map) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                target_map.remove(k);
            } else {
                merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn unescape_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {pointer:?}"))?;
    Ok(rest.split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect())
}

/// RFC 6902.
fn apply_json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).ok_or("an operation has no \"op\"")?;
        let path = unescape_pointer(op.get("path").and_then(Value::as_str).ok_or("an operation has no \"path\"")?)?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("{name}: no \"value\""));
        let from = || -> Result<Vec<String>, String> {
            unescape_pointer(op.get("from").and_then(Value::as_str).ok_or_else(|| format!("{name}: no \"from\""))?)
        };
        match name {
            "add" => json_add(doc, &path, value()?)?,
            "remove" => {
                json_remove(doc, &path)?;
            }
            "replace" => {
                json_remove(doc, &path)?;
                json_add(doc, &path, value()?)?;
            }
            "move" => {
                let v = json_remove(doc, &from()?)?;
                json_add(doc, &path, v)?;
            }
            "copy" => {
                let v = json_get(doc, &from()?).cloned().ok_or("copy: \"from\" does not exist")?;
                json_add(doc, &path, v)?;
            }
            "test" => {
                if json_get(doc, &path) != Some(&value()?) {
                    return Err(format!("testing value {} failed", op["path"]));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

fn json_get<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |node, k| match node {
        Value::Object(m) => m.get(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn json_add(doc: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent_path)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    let parent = parent_path
        .iter()
        .try_fold(doc, |node, k| match node {
            Value::Object(m) => m.get_mut(k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        })
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: /{}", path.join("/")))?;
    match parent {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let index = if last == "-" { a.len() } else { last.parse::<usize>().map_err(|e| e.to_string())? };
            if index > a.len() {
                return Err(format!("add operation does not apply: index {index} out of range"));
            }
            a.insert(index, value);
        }
        _ => return Err("add operation does not apply: parent is not a container".into()),
    }
    Ok(())
}

fn json_remove(doc: &mut Value, path: &[String]) -> Result<Value, String> {
    let (last, parent_path) = path.split_last().ok_or("cannot remove the whole document")?;
    let missing = || format!("remove operation does not apply: doc is missing path: /{}", path.join("/"));
    let parent = parent_path
        .iter()
        .try_fold(doc, |node, k| match node {
            Value::Object(m) => m.get_mut(k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        })
        .ok_or_else(missing)?;
    match parent {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let index = last.parse::<usize>().map_err(|e| e.to_string())?;
            if index < a.len() { Ok(a.remove(index)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

/// Now, as RFC 3339 in UTC with seconds (what `metav1.Time` serializes to).
fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

// =============================================================================================
// Tests
// =============================================================================================

#[cfg(test)]
mod tests {
    use super::*;

    const APPLY: &str = "application/apply-patch+yaml";
    const MERGE: &str = "application/merge-patch+json";
    const HC: &str = "/apis/helm.cattle.io/v1/namespaces/kube-system/helmcharts";

    struct T {
        kube: FakeKube,
        http: reqwest::Client,
    }

    struct Answer {
        status: u16,
        body: Value,
        text: String,
        headers: reqwest::header::HeaderMap,
    }

    async fn setup() -> T {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kube = FakeKube::start().await;
        T { kube, http: reqwest::Client::builder().user_agent("hexa-test/0.1").build().unwrap() }
    }

    impl T {
        async fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: Option<Value>) -> Answer {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut req = self.http.request(method, format!("{}{path}", self.kube.url()));
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            if let Some(body) = body {
                req = req.body(serde_json::to_vec(&body).unwrap());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let text = resp.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(Value::Null);
            Answer { status, body, text, headers }
        }

        async fn get(&self, path: &str) -> Answer {
            self.call("GET", path, None, None).await
        }

        async fn post(&self, path: &str, body: Value) -> Answer {
            self.call("POST", path, Some("application/json"), Some(body)).await
        }

        async fn put(&self, path: &str, body: Value) -> Answer {
            self.call("PUT", path, Some("application/json"), Some(body)).await
        }

        async fn delete(&self, path: &str) -> Answer {
            self.call("DELETE", path, None, None).await
        }

        async fn apply(&self, path: &str, manager: &str, force: bool, body: Value) -> Answer {
            let force = if force { "&force=true" } else { "" };
            self.call("PATCH", &format!("{path}?fieldManager={manager}{force}"), Some(APPLY), Some(body)).await
        }
    }

    fn namespace(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    }

    fn configmap(name: &str, data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
    }

    fn helmchart(name: &str, target: &str, replicas: u32) -> Value {
        json!({
            "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
            "metadata": {"name": name, "namespace": "kube-system", "labels": {"hexabase.ai/tenant": name}},
            "spec": {
                "chart": "vcluster", "repo": "https://charts.loft.sh", "version": "0.36.1",
                "targetNamespace": target, "createNamespace": false,
                "valuesContent": format!("controlPlane:\n  statefulSet:\n    highAvailability:\n      replicas: {replicas}\n"),
            },
        })
    }

    fn rv(obj: &Value) -> u64 {
        obj["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
    }

    fn assert_status(a: &Answer, code: u16, reason: &str) {
        assert_eq!(a.status, code, "{}", a.text);
        assert_eq!(a.body["kind"], "Status", "{}", a.text);
        assert_eq!(a.body["apiVersion"], "v1");
        assert_eq!(a.body["status"], "Failure");
        assert_eq!(a.body["reason"], reason, "{}", a.text);
        assert_eq!(a.body["code"], code);
    }

    /// The managers that own `path` (a `.`-free list of keys) in the object's managedFields.
    fn owners(obj: &Value, path: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for entry in obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default() {
            let mut node = &entry["fieldsV1"];
            for k in path {
                node = &node[format!("f:{k}")];
            }
            if !node.is_null() {
                out.push(format!("{}:{}", entry["manager"].as_str().unwrap(), entry["operation"].as_str().unwrap()));
            }
        }
        out
    }

    #[tokio::test]
    async fn discovery_documents_describe_the_served_resources() {
        let t = setup().await;
        let api = t.get("/api").await;
        assert_eq!(api.body["kind"], "APIVersions");
        assert_eq!(api.body["versions"], json!(["v1"]));
        let core = t.get("/api/v1").await;
        assert_eq!(core.body["kind"], "APIResourceList");
        let names: Vec<&str> =
            core.body["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        for name in ["namespaces", "namespaces/status", "namespaces/finalize", "nodes", "nodes/status", "configmaps"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let groups = t.get("/apis").await;
        let group_names: Vec<&str> =
            groups.body["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
        for g in ["apps", "batch", "helm.cattle.io"] {
            assert!(group_names.contains(&g), "{g} missing from {group_names:?}");
        }
        let helm = t.get("/apis/helm.cattle.io/v1").await;
        let hc = helm.body["resources"].as_array().unwrap().iter().find(|r| r["name"] == "helmcharts").unwrap().clone();
        assert_eq!(hc["kind"], "HelmChart");
        assert_eq!(hc["namespaced"], true);
        assert_eq!(hc["shortNames"], json!(["hc"]));
        for path in ["/apis/apps/v1", "/apis/batch/v1", "/apis/helm.cattle.io", "/version"] {
            assert_eq!(t.get(path).await.status, 200, "{path}");
        }
        // Aggregated discovery, as `kube::Discovery::run_aggregated` asks for it.
        let resp = t
            .http
            .get(format!("{}/apis", t.kube.url()))
            .header("accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json")
            .send()
            .await
            .unwrap();
        assert!(resp.headers()["content-type"].to_str().unwrap().contains("as=APIGroupDiscoveryList"));
        let list: Value = resp.json().await.unwrap();
        assert_eq!(list["kind"], "APIGroupDiscoveryList");
        let helm =
            list["items"].as_array().unwrap().iter().find(|g| g["metadata"]["name"] == "helm.cattle.io").unwrap();
        assert_eq!(helm["versions"][0]["resources"][0]["scope"], "Namespaced");
    }

    #[tokio::test]
    async fn create_get_list_and_already_exists() {
        let t = setup().await;
        let created = t.post("/api/v1/namespaces", namespace("hx-a", json!({"tier": "gold"}))).await;
        assert_eq!(created.status, 201, "{}", created.text);
        let ns = &created.body;
        assert!(ns["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        assert!(ns["metadata"]["creationTimestamp"].as_str().is_some_and(|c| c.ends_with('Z')));
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "hx-a");
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
        assert_eq!(owners(ns, &["metadata", "labels", "tier"]), vec!["hexa-test:Update".to_string()]);

        let got = t.get("/api/v1/namespaces/hx-a").await;
        assert_eq!(got.body, created.body);

        let again = t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
        assert_status(&again, 409, "AlreadyExists");
        assert_eq!(again.body["message"], "namespaces \"hx-a\" already exists");
        assert_eq!(again.body["details"], json!({"name": "hx-a", "kind": "namespaces"}));

        t.post("/api/v1/namespaces", namespace("hx-b", json!({"tier": "silver"}))).await;
        let gold = t.get("/api/v1/namespaces?labelSelector=tier%3Dgold").await;
        assert_eq!(gold.body["kind"], "NamespaceList");
        let items = gold.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "hx-a");
        assert!(items[0].get("kind").is_none(), "typed lists leave kind out of their items");
        let tiered = t.get("/api/v1/namespaces?labelSelector=tier%20in%20(gold,silver),tier!=bronze").await;
        assert_eq!(tiered.body["items"].as_array().unwrap().len(), 2);
        let by_name = t.get("/api/v1/namespaces?fieldSelector=metadata.name%3Dhx-b").await;
        assert_eq!(by_name.body["items"][0]["metadata"]["name"], "hx-b");
        assert_eq!(by_name.body["items"].as_array().unwrap().len(), 1);
        let bad = t.get("/api/v1/namespaces?fieldSelector=spec.foo%3Dx").await;
        assert_status(&bad, 400, "BadRequest");

        // Namespaced objects need their namespace to exist.
        let orphan = t.post("/api/v1/namespaces/nowhere/configmaps", configmap("c", json!({}))).await;
        assert_status(&orphan, 404, "NotFound");
        assert_eq!(orphan.body["message"], "namespaces \"nowhere\" not found");
        let invalid = t.post("/api/v1/namespaces", namespace("Not_A_Label", json!({}))).await;
        assert_status(&invalid, 422, "Invalid");
        assert_eq!(invalid.body["details"]["causes"][0]["field"], "metadata.name");
    }

    #[tokio::test]
    async fn list_pages_with_limit_and_continue() {
        let t = setup().await;
        for i in 0..5 {
            t.post("/api/v1/namespaces/default/configmaps", configmap(&format!("c{i}"), json!({}))).await;
        }
        let mut names = Vec::new();
        let mut path = "/api/v1/namespaces/default/configmaps?limit=2".to_string();
        loop {
            let page = t.get(&path).await;
            names.extend(
                page.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
            );
            match page.body["metadata"]["continue"].as_str() {
                Some(token) => path = format!("/api/v1/namespaces/default/configmaps?limit=2&continue={token}"),
                None => break,
            }
        }
        assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    }

    #[tokio::test]
    async fn missing_objects_and_resources_answer_404_as_the_api_server_does() {
        let t = setup().await;
        let missing = t.get("/api/v1/namespaces/default/configmaps/nope").await;
        assert_status(&missing, 404, "NotFound");
        assert_eq!(missing.body["message"], "configmaps \"nope\" not found");
        let missing_hc = t.get(&format!("{HC}/nope")).await;
        assert_eq!(missing_hc.body["message"], "helmcharts.helm.cattle.io \"nope\" not found");
        assert_eq!(missing_hc.body["details"]["group"], "helm.cattle.io");
        let no_kind = t.get("/api/v1/namespaces/default/widgets").await;
        assert_status(&no_kind, 404, "NotFound");
        assert_eq!(no_kind.body["message"], "the server could not find the requested resource");
        let no_group = t.get("/apis/example.com/v1/namespaces/default/widgets").await;
        assert_eq!(no_group.status, 404);
        assert_eq!(no_group.text, "404 page not found\n");

        // A CRD that is not installed: the group disappears, and so does its discovery.
        assert!(t.kube.set_served("helmcharts.helm.cattle.io", false));
        t.kube.set_served("helmchartconfigs", false);
        let gone = t.get(HC).await;
        assert_eq!((gone.status, gone.text.as_str()), (404, "404 page not found\n"));
        assert!(!t.get("/apis").await.text.contains("helm.cattle.io"));
        t.kube.set_served("helmcharts", true);
        assert_eq!(t.get(HC).await.status, 200);

        // A registered custom resource is served like any other.
        t.kube.register_resource(ResourceDef::custom("example.com", "v1alpha1", "widgets", "Widget", true));
        let w = json!({"apiVersion": "example.com/v1alpha1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 3}});
        let created = t.apply("/apis/example.com/v1alpha1/namespaces/default/widgets/w", "tester", false, w).await;
        assert_eq!(created.status, 201, "{}", created.text);
        assert_eq!(t.kube.object("widgets", "default", "w").unwrap()["spec"]["size"], 3);
    }

    #[tokio::test]
    async fn replace_with_a_stale_resource_version_conflicts() {
        let t = setup().await;
        let path = "/api/v1/namespaces/default/configmaps";
        let created = t.post(path, configmap("c", json!({"a": "1"}))).await.body;
        let mut update = created.clone();
        update["data"]["a"] = json!("2");
        let updated = t.put(&format!("{path}/c"), update.clone()).await;
        assert_eq!(updated.status, 200, "{}", updated.text);
        assert!(rv(&updated.body) > rv(&created));
        assert_eq!(updated.body["metadata"]["uid"], created["metadata"]["uid"]);

        // `update` still carries the first resourceVersion.
        update["data"]["a"] = json!("3");
        let stale = t.put(&format!("{path}/c"), update.clone()).await;
        assert_status(&stale, 409, "Conflict");
        assert_eq!(
            stale.body["message"],
            "Operation cannot be fulfilled on configmaps \"c\": the object has been modified; please apply your changes to \
             the latest version and try again"
        );
        // Without a resourceVersion the update is unconditional.
        update["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        let forced = t.put(&format!("{path}/c"), update).await;
        assert_eq!(forced.status, 200);
        assert_eq!(forced.body["data"]["a"], "3");
        // Replacing something that does not exist is a 404, and names must match the URL.
        assert_status(&t.put(&format!("{path}/other"), configmap("other", json!({}))).await, 404, "NotFound");
        assert_status(&t.put(&format!("{path}/c"), configmap("d", json!({}))).await, 400, "BadRequest");
    }

    #[tokio::test]
    async fn delete_with_finalizers_waits_until_they_are_removed() {
        let t = setup().await;
        let path = "/api/v1/namespaces/default/configmaps";
        let mut cm = configmap("held", json!({}));
        cm["metadata"]["finalizers"] = json!(["example.com/hold"]);
        t.post(path, cm).await;
        let deleted = t.delete(&format!("{path}/held")).await;
        assert_eq!(deleted.status, 200);
        assert!(deleted.body["metadata"]["deletionTimestamp"].is_string(), "{}", deleted.text);
        assert_eq!(t.get(&format!("{path}/held")).await.status, 200, "kept while the finalizer is there");
        // No new finalizers on an object being deleted.
        let more = t
            .call(
                "PATCH",
                &format!("{path}/held"),
                Some(MERGE),
                Some(json!({"metadata": {"finalizers": ["example.com/hold", "x/y"]}})),
            )
            .await;
        assert_status(&more, 422, "Invalid");
        let released = t
            .call("PATCH", &format!("{path}/held"), Some(MERGE), Some(json!({"metadata": {"finalizers": null}})))
            .await;
        assert_eq!(released.status, 200, "{}", released.text);
        assert_status(&t.get(&format!("{path}/held")).await, 404, "NotFound");

        // Without finalizers a built-in kind goes at once and the answer is a Success Status.
        t.post(path, configmap("plain", json!({}))).await;
        let gone = t.delete(&format!("{path}/plain")).await;
        assert_eq!(gone.body["status"], "Success");
        assert_eq!(gone.body["details"]["name"], "plain");
        assert_status(&t.delete(&format!("{path}/plain")).await, 404, "NotFound");
    }

    #[tokio::test]
    async fn apply_sets_fields_and_a_dropped_field_is_removed() {
        let t = setup().await;
        let path = "/api/v1/namespaces/hx-a";
        let first = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"a": "1", "b": "2"}))).await;
        assert_eq!(first.status, 201, "{}", first.text);
        assert_eq!(owners(&first.body, &["metadata", "labels", "a"]), vec!["hexa-coordinator:Apply".to_string()]);
        let entry = &first.body["metadata"]["managedFields"][0];
        assert_eq!(entry["fieldsType"], "FieldsV1");
        assert_eq!(entry["apiVersion"], "v1");
        assert_eq!(entry["fieldsV1"], json!({"f:metadata": {"f:labels": {"f:a": {}, "f:b": {}}}}));

        let second = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"a": "1"}))).await;
        assert_eq!(second.status, 200);
        let labels = second.body["metadata"]["labels"].as_object().unwrap();
        assert!(!labels.contains_key("b"), "b was dropped from the applied config: {labels:?}");
        assert_eq!(labels["a"], "1");
        assert_eq!(labels["kubernetes.io/metadata.name"], "hx-a", "server-set label stays");
        assert!(rv(&second.body) > rv(&first.body));

        // Apply needs a field manager, and apiVersion/kind in the body.
        let no_manager = t.call("PATCH", path, Some(APPLY), Some(namespace("hx-a", json!({})))).await;
        assert_status(&no_manager, 422, "Invalid");
        assert_eq!(
            no_manager.body["message"],
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
        );
        let no_kind = t.apply(path, "hexa-coordinator", false, json!({"metadata": {"name": "hx-a"}})).await;
        assert_status(&no_kind, 400, "BadRequest");
    }

    #[tokio::test]
    async fn apply_conflicts_with_another_manager_unless_forced() {
        let t = setup().await;
        let path = "/api/v1/namespaces/hx-a";
        t.apply(path, "other", false, namespace("hx-a", json!({"shared": "x", "theirs": "1"}))).await;
        let clash = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"theirs": "2"}))).await;
        assert_status(&clash, 409, "Conflict");
        assert_eq!(
            clash.body["message"],
            "Apply failed with 1 conflict: conflict with \"other\" using v1: .metadata.labels.theirs"
        );
        assert_eq!(
            clash.body["details"]["causes"],
            json!([{"reason": "FieldManagerConflict", "message": "conflict with \"other\" using v1",
                "field": ".metadata.labels.theirs"}])
        );
        assert_eq!(t.kube.object("namespaces", "", "hx-a").unwrap()["metadata"]["labels"]["theirs"], "1", "unchanged");

        // The same value is no conflict: the field becomes shared.
        let shared = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"shared": "x"}))).await;
        assert_eq!(shared.status, 200, "{}", shared.text);
        let mut both = owners(&shared.body, &["metadata", "labels", "shared"]);
        both.sort();
        assert_eq!(both, vec!["hexa-coordinator:Apply".to_string(), "other:Apply".to_string()]);
        // One owner dropping a shared field leaves it; the last one dropping it removes it.
        let dropped = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({}))).await;
        assert_eq!(dropped.body["metadata"]["labels"]["shared"], "x");
        let dropped = t.apply(path, "other", false, namespace("hx-a", json!({"theirs": "1"}))).await;
        assert!(dropped.body["metadata"]["labels"].get("shared").is_none(), "{}", dropped.text);

        // Forcing takes the field over.
        let forced = t.apply(path, "hexa-coordinator", true, namespace("hx-a", json!({"theirs": "2"}))).await;
        assert_eq!(forced.status, 200, "{}", forced.text);
        assert_eq!(forced.body["metadata"]["labels"]["theirs"], "2");
        assert_eq!(owners(&forced.body, &["metadata", "labels", "theirs"]), vec!["hexa-coordinator:Apply".to_string()]);
        // ... and now the other manager is the one that conflicts.
        let back = t.apply(path, "other", false, namespace("hx-a", json!({"theirs": "1"}))).await;
        assert_status(&back, 409, "Conflict");
    }

    #[tokio::test]
    async fn apply_conflicts_with_an_update_manager_and_lists_are_atomic() {
        let t = setup().await;
        // The K3s agent registered the node with a taint of its own (an Update operation).
        let mut node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
                              "spec": {"taints": [{"key": "node.example.com/maintenance", "effect": "NoSchedule"}]}});
        t.kube.upsert("nodes", node.clone(), "k3s").unwrap();
        let ours = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"hexabase.ai/pool": "dedicated"}},
                          "spec": {"taints": [{"key": "hexabase.ai/dedicated", "value": "acme",
                              "effect": "NoSchedule"}]}});
        let clash = t.apply("/api/v1/nodes/n1", "hexa-coordinator", false, ours.clone()).await;
        assert_status(&clash, 409, "Conflict");
        assert_eq!(clash.body["message"], "Apply failed with 1 conflict: conflict with \"k3s\" using v1: .spec.taints");
        // Labels are granular: the label alone applies cleanly next to the agent's.
        let mut labels_only = ours.clone();
        labels_only.as_object_mut().unwrap().remove("spec");
        let ok = t.apply("/api/v1/nodes/n1", "hexa-coordinator", false, labels_only).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
        assert_eq!(ok.body["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        // Forced, the whole list is replaced and owned by the applier.
        let forced = t.apply("/api/v1/nodes/n1", "hexa-coordinator", true, ours).await;
        assert_eq!(
            forced.body["spec"]["taints"],
            json!([{"key": "hexabase.ai/dedicated", "value": "acme", "effect": "NoSchedule"}])
        );
        assert_eq!(owners(&forced.body, &["spec", "taints"]), vec!["hexa-coordinator:Apply".to_string()]);
        // Bad taints are refused with the API server's causes.
        node["spec"]["taints"] = json!([{"key": "a", "effect": "Sometimes"}, {"key": "a", "effect": "Sometimes"}]);
        let bad = t.apply("/api/v1/nodes/n1", "hexa-coordinator", true, node).await;
        assert_status(&bad, 422, "Invalid");
        let fields: Vec<&str> =
            bad.body["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
        assert_eq!(fields, ["spec.taints[0].effect", "spec.taints[1].effect", "spec.taints[1]"]);
    }

    #[tokio::test]
    async fn a_no_op_apply_is_not_a_write() {
        let t = setup().await;
        let path = "/api/v1/namespaces/hx-a";
        let body = namespace("hx-a", json!({"hexabase.ai/tenant": "a"}));
        let first = t.apply(path, "hexa-coordinator", false, body.clone()).await;
        let events_before = t.kube.resource_version();
        let again = t.apply(path, "hexa-coordinator", false, body.clone()).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body, first.body, "same object, same resourceVersion, same managedFields times");
        assert_eq!(t.kube.resource_version(), events_before);
        assert_eq!((t.kube.writes(), t.kube.changes()), (2, 1));
        let log = t.kube.requests();
        assert_eq!(log.iter().map(|r| r.changed).collect::<Vec<_>>(), [true, false]);
        assert_eq!(log[1].verb, Some(Verb::Patch));
        assert_eq!(log[1].resource, "namespaces");
        // Merge patches and PUTs that change nothing are no-ops too; dry runs never write.
        t.call("PATCH", path, Some(MERGE), Some(json!({"metadata": {"labels": {"hexabase.ai/tenant": "a"}}}))).await;
        let mut changed = body;
        changed["metadata"]["labels"]["x"] = json!("y");
        let dry = t
            .call("PATCH", &format!("{path}?fieldManager=hexa-coordinator&dryRun=All"), Some(APPLY), Some(changed))
            .await;
        assert_eq!(dry.body["metadata"]["labels"]["x"], "y");
        assert!(t.kube.object("namespaces", "", "hx-a").unwrap()["metadata"]["labels"].get("x").is_none());
        assert_eq!((t.kube.writes(), t.kube.changes()), (4, 1));
        t.kube.reset_counters();
        assert_eq!((t.kube.writes(), t.kube.changes(), t.kube.requests().len()), (0, 0, 0));
    }

    #[tokio::test]
    async fn merge_patch_json_patch_and_strategic_patch() {
        let t = setup().await;
        t.kube.add_node("n1", &[("node-role.kubernetes.io/worker", "true")]).unwrap();
        let merged = t
            .call(
                "PATCH",
                "/api/v1/nodes/n1?fieldManager=labeler",
                Some(MERGE),
                Some(json!({"metadata": {"labels": {"pool": "shared"}}})),
            )
            .await;
        assert_eq!(merged.status, 200, "{}", merged.text);
        assert_eq!(merged.body["metadata"]["labels"]["pool"], "shared");
        assert_eq!(owners(&merged.body, &["metadata", "labels", "pool"]), vec!["labeler:Update".to_string()]);
        let patch = json!([
            {"op": "test", "path": "/metadata/labels/pool", "value": "shared"},
            {"op": "add", "path": "/spec/taints", "value": [{"key": "a", "effect": "NoSchedule"}]},
            {"op": "remove", "path": "/metadata/labels/pool"},
        ]);
        let patched = t.call("PATCH", "/api/v1/nodes/n1", Some("application/json-patch+json"), Some(patch)).await;
        assert_eq!(patched.status, 200, "{}", patched.text);
        assert!(patched.body["metadata"]["labels"].get("pool").is_none());
        assert_eq!(patched.body["spec"]["taints"][0]["key"], "a");
        let failed_test = json!([{"op": "test", "path": "/metadata/name", "value": "n2"}]);
        let refused = t.call("PATCH", "/api/v1/nodes/n1", Some("application/json-patch+json"), Some(failed_test)).await;
        assert_status(&refused, 422, "Invalid");
        // Custom resources do not take strategic merge patches.
        t.apply(&format!("{HC}/x"), "hexa-coordinator", false, helmchart("x", "kube-system", 1)).await;
        let strategic = t
            .call(
                "PATCH",
                &format!("{HC}/x"),
                Some("application/strategic-merge-patch+json"),
                Some(json!({"spec": {"version": "1"}})),
            )
            .await;
        assert_status(&strategic, 415, "UnsupportedMediaType");
        // A merge patch carrying a stale resourceVersion is a conflict.
        let stale =
            t.call("PATCH", "/api/v1/nodes/n1", Some(MERGE), Some(json!({"metadata": {"resourceVersion": "1"}}))).await;
        assert_status(&stale, 409, "Conflict");
    }

    #[tokio::test]
    async fn status_subresource_is_written_apart_from_the_object() {
        let t = setup().await;
        let path = "/apis/apps/v1/namespaces/default/statefulsets";
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
                         "spec": {"replicas": 2}, "status": {"readyReplicas": 9}});
        let created = t.post(path, sts).await;
        assert!(created.body.get("status").is_none(), "status is not set through the main resource: {}", created.text);
        assert_eq!(created.body["metadata"]["generation"], 1);
        let body = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
                          "status": {"readyReplicas": 2}, "spec": {"replicas": 7}});
        let status = t.apply(&format!("{path}/s/status"), "tester", false, body).await;
        assert_eq!(status.status, 200, "{}", status.text);
        assert_eq!(status.body["status"]["readyReplicas"], 2);
        assert_eq!(status.body["spec"]["replicas"], 2, "spec is not written through /status");
        assert_eq!(status.body["metadata"]["generation"], 1, "status changes do not bump generation");
        let scaled = t.call("PATCH", &format!("{path}/s"), Some(MERGE), Some(json!({"spec": {"replicas": 3}}))).await;
        assert_eq!(scaled.body["metadata"]["generation"], 2);
        let labelled =
            t.call("PATCH", &format!("{path}/s"), Some(MERGE), Some(json!({"metadata": {"labels": {"a": "b"}}}))).await;
        assert_eq!(labelled.body["metadata"]["generation"], 2, "metadata changes do not bump generation");
        t.kube.make_statefulset_ready("default", "s").unwrap();
        assert_eq!(t.kube.object("sts", "default", "s").unwrap()["status"]["readyReplicas"], 3);
    }

    #[tokio::test]
    async fn namespace_deletion_terminates_then_removes_the_contents() {
        let t = setup().await;
        t.kube.set_namespace_deletion(NamespaceDeletion::Manual);
        t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
        t.post("/api/v1/namespaces/hx-a/configmaps", configmap("c", json!({}))).await;
        let mut held = configmap("held", json!({}));
        held["metadata"]["finalizers"] = json!(["example.com/hold"]);
        t.post("/api/v1/namespaces/hx-a/configmaps", held).await;

        let deleted = t.delete("/api/v1/namespaces/hx-a").await;
        assert_eq!(deleted.status, 200);
        assert_eq!(deleted.body["status"]["phase"], "Terminating");
        assert!(deleted.body["metadata"]["deletionTimestamp"].is_string());
        let refused = t.post("/api/v1/namespaces/hx-a/configmaps", configmap("new", json!({}))).await;
        assert_status(&refused, 403, "Forbidden");
        assert_eq!(refused.body["details"]["causes"][0]["reason"], "NamespaceTerminating");
        let twice = t.delete("/api/v1/namespaces/hx-a").await;
        assert_status(&twice, 409, "Conflict");
        assert_eq!(t.get("/api/v1/namespaces/hx-a/configmaps/c").await.status, 200, "nothing happens until released");

        assert!(t.kube.finish_namespace_deletion("hx-a"));
        assert_eq!(t.get("/api/v1/namespaces/hx-a/configmaps/c").await.status, 404);
        assert!(t.kube.object("configmaps", "hx-a", "held").unwrap()["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(t.get("/api/v1/namespaces/hx-a").await.status, 200, "kept while content remains");
        t.kube
            .upsert(
                "configmaps",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "held", "namespace": "hx-a"}}),
                "tester",
            )
            .unwrap();
        assert_status(&t.get("/api/v1/namespaces/hx-a").await, 404, "NotFound");

        // Immediate mode (the default) finalizes right after the DELETE.
        t.kube.set_namespace_deletion(NamespaceDeletion::Immediate);
        t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await;
        t.post("/api/v1/namespaces/hx-b/configmaps", configmap("c", json!({}))).await;
        assert_eq!(t.delete("/api/v1/namespaces/hx-b").await.body["status"]["phase"], "Terminating");
        assert!(t.kube.object("namespaces", "", "hx-b").is_none());
        assert!(t.kube.list("configmaps", Some("hx-b")).is_empty());
        // After(d): gone once the delay has passed.
        t.kube.set_namespace_deletion(NamespaceDeletion::After(Duration::from_millis(50)));
        t.post("/api/v1/namespaces", namespace("hx-c", json!({}))).await;
        t.delete("/api/v1/namespaces/hx-c").await;
        assert!(t.kube.object("namespaces", "", "hx-c").is_some());
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.kube.object("namespaces", "", "hx-c").is_some() {
            assert!(Instant::now() < deadline, "hx-c was not finalized");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let protected = t.delete("/api/v1/namespaces/kube-system").await;
        assert_status(&protected, 403, "Forbidden");
    }

    #[tokio::test]
    async fn faults_answer_with_status_errors_then_stop() {
        let t = setup().await;
        t.kube.fail_next(Verb::Patch, "namespaces", 500, 2);
        t.kube.fail_next(Verb::Get, "helmcharts.helm.cattle.io", 403, 1);
        t.kube.inject(Fault::new(Verb::Any, "configmaps", 422, 1).named("special"));
        let body = namespace("hx-a", json!({}));
        for _ in 0..2 {
            let failed = t.apply("/api/v1/namespaces/hx-a", "m", false, body.clone()).await;
            assert_status(&failed, 500, "InternalError");
        }
        assert_eq!(t.apply("/api/v1/namespaces/hx-a", "m", false, body).await.status, 201);
        let forbidden = t.get(&format!("{HC}/x")).await;
        assert_status(&forbidden, 403, "Forbidden");
        assert!(forbidden.body["message"].as_str().unwrap().contains(
            "cannot get resource \"helmcharts\" in API group \"helm.cattle.io\" in the namespace \"kube-system\""
        ));
        assert_status(&t.get(&format!("{HC}/x")).await, 404, "NotFound");
        assert_eq!(t.get("/api/v1/namespaces/default/configmaps/other").await.status, 404);
        assert_status(&t.get("/api/v1/namespaces/default/configmaps/special").await, 422, "Invalid");
        // Faulted writes count as writes, not changes.
        assert_eq!((t.kube.writes(), t.kube.changes()), (3, 1));

        t.kube.fail_next(Verb::Create, "*", 409, 1);
        assert_status(&t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await, 409, "AlreadyExists");
        t.kube.fail_next(Verb::Update, "*", 409, 1);
        let ns = t.kube.object("ns", "", "hx-a").unwrap();
        assert_status(&t.put("/api/v1/namespaces/hx-a", ns).await, 409, "Conflict");
        t.kube.fail_next(Verb::List, "*", 404, 1);
        assert_status(&t.get("/api/v1/namespaces").await, 404, "NotFound");

        t.kube.fail_all(Some(503));
        assert_status(&t.get("/api").await, 503, "ServiceUnavailable");
        assert_status(&t.get("/api/v1/namespaces/hx-a").await, 503, "ServiceUnavailable");
        t.kube.fail_all(None);
        assert_eq!(t.get("/api/v1/namespaces/hx-a").await.status, 200);

        t.kube.set_latency(Duration::from_millis(100));
        let started = Instant::now();
        t.get("/api").await;
        assert!(started.elapsed() >= Duration::from_millis(100), "latency is a lower bound on every answer");
        t.kube.set_latency(Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_goes_away_and_comes_back_on_the_same_port() {
        let t = setup().await;
        t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
        let url = t.kube.url();
        t.kube.set_down(true);
        for _ in 0..3 {
            let result = t.http.get(format!("{url}/api/v1/namespaces/hx-a")).send().await;
            assert!(result.is_err(), "answered while down: {result:?}");
        }
        let fresh = reqwest::Client::new();
        assert!(fresh.get(format!("{url}/api")).send().await.is_err());
        t.kube.set_down(false);
        assert_eq!(t.kube.url(), url);
        let back = t.get("/api/v1/namespaces/hx-a").await;
        assert_eq!(back.status, 200, "state survives: {}", back.text);
    }

    #[tokio::test]
    async fn helmchart_install_job_runs_and_the_statefulset_follows() {
        let t = setup().await;
        t.post("/api/v1/namespaces", namespace("hx-acme", json!({}))).await;
        let applied = t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 3)).await;
        assert_eq!(applied.status, 201, "{}", applied.text);
        assert_eq!(applied.body["spec"]["failurePolicy"], "reinstall", "CRD default");
        assert_eq!(applied.body["spec"]["driver"], "secret", "CRD default");

        let chart = t.kube.object("helmcharts", "kube-system", "acme").unwrap();
        assert_eq!(chart["metadata"]["finalizers"], json!([HELM_CHART_FINALIZER]));
        assert_eq!(chart["metadata"]["annotations"][HELM_MANAGED_BY_ANNOTATION], "helm-controller");
        assert_eq!(chart["status"]["jobName"], "helm-install-acme");
        assert_eq!(chart["status"]["conditions"][0]["type"], "JobCreated");
        let job = t.get("/apis/batch/v1/namespaces/kube-system/jobs/helm-install-acme").await.body;
        assert_eq!(job["metadata"]["labels"][HELM_CHART_LABEL], "acme");
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], chart["metadata"]["uid"]);
        assert_eq!(job["status"]["active"], 1);
        assert!(
            job["spec"]["template"]["metadata"]["annotations"][HELM_CONFIG_HASH_ANNOTATION]
                .as_str()
                .unwrap()
                .starts_with("SHA256=")
        );
        let args = job["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        assert_eq!(args, json!(["install", "--namespace", "hx-acme", "--version", "0.36.1"]));

        // Re-applying the same chart changes nothing (the controller's own fields are its own).
        let writes_before = t.kube.changes();
        let again = t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 3)).await;
        assert_eq!(again.status, 200, "{}", again.text);
        assert_eq!(t.kube.changes(), writes_before);

        t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
        let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
        let kinds: Vec<&str> =
            job["status"]["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["SuccessCriteriaMet", "Complete"]);
        assert_eq!(job["status"]["succeeded"], 1);
        let sts = t.kube.object("statefulsets", "hx-acme", "acme").unwrap();
        assert_eq!(sts["spec"]["replicas"], 3);
        assert!(sts["status"].get("readyReplicas").is_none(), "not ready yet: {}", sts["status"]);
        t.kube.make_statefulset_ready("hx-acme", "acme").unwrap();
        assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["status"]["readyReplicas"], 3);

        // New values: helm-controller replaces the install Job with a fresh one.
        let old_uid = job["metadata"]["uid"].clone();
        t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
        let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
        assert_ne!(job["metadata"]["uid"], old_uid);
        assert!(job["status"].get("succeeded").is_none());
        assert!(t.kube.complete_job("kube-system", "helm-install-acme").is_ok());
        assert!(t.kube.complete_job("kube-system", "helm-install-acme").is_err(), "a finished Job stays finished");
        assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["spec"]["replicas"], 1);
    }

    #[tokio::test]
    async fn failed_install_jobs_are_reported_on_the_job() {
        let t = setup().await;
        // No target namespace: the install fails as Helm's would.
        t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-missing", 1)).await;
        let err = t.kube.complete_job("kube-system", "helm-install-acme").unwrap_err();
        assert!(err.contains("namespaces \"hx-missing\" not found"), "{err}");
        let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
        assert_eq!(job["status"]["failed"], 1, "a pod failed");
        assert_eq!(job["status"]["active"], 1, "and the Job retries (backoffLimit 1000)");
        assert!(job["status"].get("conditions").is_none());
        assert!(t.kube.object("statefulsets", "hx-missing", "acme").is_none());
        t.post("/api/v1/namespaces", namespace("hx-missing", json!({}))).await;
        t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
        assert!(t.kube.object("statefulsets", "hx-missing", "acme").is_some());

        // Instant mode: the retry succeeds by itself once the namespace appears.
        t.kube.set_helm_controller(HelmControllerSettings::instant());
        t.apply(&format!("{HC}/late"), "hexa-coordinator", false, helmchart("late", "hx-late", 1)).await;
        assert!(t.kube.object("jobs", "kube-system", "helm-install-late").unwrap()["status"]["failed"] == 1);
        t.apply("/api/v1/namespaces/hx-late", "hexa-coordinator", false, namespace("hx-late", json!({}))).await;
        let job = t.kube.object("jobs", "kube-system", "helm-install-late").unwrap();
        assert_eq!(job["status"]["succeeded"], 1, "{}", job["status"]);
        assert_eq!(t.kube.object("statefulsets", "hx-late", "late").unwrap()["status"]["readyReplicas"], 1);
        t.kube.set_helm_controller(HelmControllerSettings::default());

        t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await;
        t.apply(&format!("{HC}/b"), "hexa-coordinator", false, helmchart("b", "hx-b", 1)).await;
        t.kube.fail_job("kube-system", "helm-install-b", "chart vcluster-9.9.9 not found").unwrap();
        let job = t.kube.object("jobs", "kube-system", "helm-install-b").unwrap();
        assert_eq!(job["status"]["conditions"][1]["message"], "chart vcluster-9.9.9 not found");
        assert_eq!(job["status"]["failed"], 1);
        assert!(t.kube.complete_job("kube-system", "nope").is_err());
    }

    #[tokio::test]
    async fn deleting_a_helmchart_runs_the_delete_job_and_holds_the_finalizer() {
        let t = setup().await;
        t.post("/api/v1/namespaces", namespace("hx-acme", json!({}))).await;
        t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
        t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
        assert!(t.kube.object("statefulsets", "hx-acme", "acme").is_some());

        let deleted = t.delete(&format!("{HC}/acme")).await;
        assert_eq!(deleted.status, 200);
        assert!(deleted.body["metadata"]["deletionTimestamp"].is_string(), "{}", deleted.text);
        assert!(t.kube.object("jobs", "kube-system", "helm-install-acme").is_none());
        let job = t.kube.object("jobs", "kube-system", "helm-delete-acme").unwrap();
        assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"], json!(["delete"]));
        assert!(t.kube.object("helmcharts", "kube-system", "acme").is_some(), "held by {HELM_CHART_FINALIZER}");
        // Re-applying while deleting does not bring it back.
        let reapplied =
            t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
        assert!(reapplied.body["metadata"]["deletionTimestamp"].is_string());

        t.kube.complete_job("kube-system", "helm-delete-acme").unwrap();
        assert_status(&t.get(&format!("{HC}/acme")).await, 404, "NotFound");
        assert!(t.kube.object("statefulsets", "hx-acme", "acme").is_none(), "helm uninstall removed the release");
        assert!(t.kube.list("jobs", Some("kube-system")).is_empty());

        // With instant settings the whole cycle happens on its own.
        t.kube.set_helm_controller(HelmControllerSettings::instant());
        t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 2)).await;
        assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["status"]["readyReplicas"], 2);
        t.delete(&format!("{HC}/acme")).await;
        assert!(t.kube.object("helmcharts", "kube-system", "acme").is_none());
    }

    #[tokio::test]
    async fn helmcharts_are_validated_against_the_crd_schema() {
        let t = setup().await;
        let mut bad = helmchart("bad", "hx-a", 1);
        bad["spec"]["bootstrap"] = json!("yes");
        bad["spec"]["failurePolicy"] = json!("sometimes");
        let refused = t.apply(&format!("{HC}/bad"), "hexa-coordinator", false, bad).await;
        assert_status(&refused, 422, "Invalid");
        let causes = refused.body["details"]["causes"].as_array().unwrap();
        let mut fields: Vec<(&str, &str)> =
            causes.iter().map(|c| (c["field"].as_str().unwrap(), c["reason"].as_str().unwrap())).collect();
        fields.sort();
        assert_eq!(
            fields,
            [("spec.bootstrap", "FieldValueTypeInvalid"), ("spec.failurePolicy", "FieldValueNotSupported")]
        );
        let message = refused.body["message"].as_str().unwrap();
        assert!(message.starts_with("HelmChart.helm.cattle.io \"bad\" is invalid: ["), "{message}");
        assert!(message.contains("spec.bootstrap in body must be of type boolean: \"string\""), "{message}");
        assert_eq!(refused.body["details"]["kind"], "HelmChart");
        assert!(t.kube.object("helmcharts", "kube-system", "bad").is_none());

        // Unknown fields are dropped with a warning, or refused when asked to be strict.
        let mut extra = helmchart("extra", "hx-a", 1);
        extra["spec"]["valuesContnet"] = json!("typo");
        let strict = t
            .call(
                "PATCH",
                &format!("{HC}/extra?fieldManager=m&fieldValidation=Strict"),
                Some(APPLY),
                Some(extra.clone()),
            )
            .await;
        assert_status(&strict, 400, "BadRequest");
        assert!(strict.body["message"].as_str().unwrap().contains("unknown field \"spec.valuesContnet\""));
        let warned = t.apply(&format!("{HC}/extra"), "m", false, extra).await;
        assert_eq!(warned.status, 201);
        assert!(warned.body["spec"].get("valuesContnet").is_none());
        let warning = warned.headers.get("warning").unwrap().to_str().unwrap();
        assert!(warning.contains("unknown field"), "{warning}");
        assert_eq!(
            t.kube.requests().last().unwrap().warnings,
            vec!["unknown field \"spec.valuesContnet\"".to_string()]
        );

        // The CRD's transition rule: driver is immutable once set.
        let mut driver = helmchart("extra", "hx-a", 1);
        driver["spec"]["driver"] = json!("configmap");
        let immutable = t.apply(&format!("{HC}/extra"), "m", false, driver).await;
        assert_status(&immutable, 422, "Invalid");
        assert!(
            immutable.body["message"].as_str().unwrap().contains("driver is immutable after creation"),
            "{}",
            immutable.text
        );
    }

    #[tokio::test]
    async fn watch_streams_changes_after_a_resource_version() {
        let t = setup().await;
        t.post("/api/v1/namespaces/default/configmaps", configmap("before", json!({}))).await;
        let from = t.kube.resource_version();
        let mut watch = t
            .http
            .get(format!(
                "{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={from}&timeoutSeconds=10",
                t.kube.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(watch.status(), 200);
        t.post("/api/v1/namespaces/default/configmaps", configmap("after", json!({}))).await;
        t.delete("/api/v1/namespaces/default/configmaps/after").await;
        let mut text = String::new();
        while text.lines().count() < 2 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), watch.chunk()).await.unwrap().unwrap().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(events[0]["type"], "ADDED");
        assert_eq!(events[0]["object"]["metadata"]["name"], "after");
        assert_eq!(events[1]["type"], "DELETED");
        assert!(rv(&events[1]["object"]) > rv(&events[0]["object"]));

        // From scratch, a watch starts with the current objects.
        let initial = t
            .http
            .get(format!("{}/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1", t.kube.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let first: Value = serde_json::from_str(initial.lines().next().unwrap()).unwrap();
        assert_eq!(
            (first["type"].as_str(), first["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some("before"))
        );
    }
}

/// The same server through the real `kube` client: its requests, its parsing of answers and of
/// `Status` errors, discovery, and what it sees when the server goes away.
#[cfg(test)]
mod kube_client_tests {
    use super::*;
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{
        Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
    };
    use kube::core::{ApiResource, GroupVersionKind};

    fn client(fake: &FakeKube) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new(fake.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn api_status(err: kube::Error) -> (u16, String, String) {
        match err {
            kube::Error::Api(status) => (status.code, status.reason.clone(), status.message.clone()),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    fn helm_charts(client: &kube::Client) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart");
        Api::namespaced_with(client.clone(), "kube-system", &ApiResource::from_gvk_with_plural(&gvk, "helmcharts"))
    }

    #[tokio::test]
    async fn typed_api_applies_reads_lists_and_deletes() {
        let fake = FakeKube::start().await;
        let client = client(&fake);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ssa = PatchParams::apply("hexa-coordinator");
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "a", "stale": "x"}}});
        namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "a"}}});
        let applied = namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
        let labels = applied.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("hexabase.ai/tenant").map(String::as_str), Some("a"));
        assert!(!labels.contains_key("stale"));
        assert_eq!(applied.status.and_then(|s| s.phase).as_deref(), Some("Active"));
        let rv = applied.metadata.resource_version.clone();
        let again = namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
        assert_eq!(again.metadata.resource_version, rv, "no-op apply");
        assert_eq!((fake.writes(), fake.changes()), (3, 2));

        assert!(namespaces.get_opt("hx-nope").await.unwrap().is_none());
        let exists = namespaces.create(&PostParams::default(), &serde_json::from_value(ns.clone()).unwrap()).await;
        assert_eq!(api_status(exists.unwrap_err()).1, "AlreadyExists");

        let clash = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "b"}}});
        let (code, reason, message) = api_status(
            namespaces.patch("hx-a", &PatchParams::apply("other"), &Patch::Apply(&clash)).await.unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "Conflict"));
        assert!(message.contains("conflict with \"hexa-coordinator\""), "{message}");
        namespaces.patch("hx-a", &PatchParams::apply("other").force(), &Patch::Apply(&clash)).await.unwrap();

        let listed = namespaces.list(&ListParams::default().labels("hexabase.ai/tenant=b")).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].metadata.name.as_deref(), Some("hx-a"));
        let deleted = namespaces.delete("hx-a", &DeleteParams::default()).await.unwrap();
        assert!(deleted.is_left(), "a namespace delete answers with the namespace");
        assert!(namespaces.get_opt("hx-a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn dynamic_api_for_helmcharts_and_discovery() {
        let fake = FakeKube::start().await;
        let client = client(&fake);
        let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
        assert!(discovery.has_group("helm.cattle.io"));
        let (resource, caps) =
            discovery.resolve_gvk(&GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart")).unwrap();
        assert_eq!(resource.plural, "helmcharts");
        assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
        let aggregated = kube::Discovery::new(client.clone()).run_aggregated().await.unwrap();
        assert!(aggregated.has_group("batch"));

        let charts = helm_charts(&client);
        let chart = json!({
            "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
                "metadata": {"name": "acme", "namespace": "kube-system"},
            "spec": {"chart": "vcluster", "repo": "https://charts.loft.sh", "version": "0.36.1",
                "targetNamespace": "default"},
        });
        let chart: DynamicObject = serde_json::from_value(chart).unwrap();
        charts.patch("acme", &PatchParams::apply("hexa-coordinator"), &Patch::Apply(&chart)).await.unwrap();
        fake.complete_job("kube-system", "helm-install-acme").unwrap();
        let jobs: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            "kube-system",
            &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("batch", "v1", "Job"), "jobs"),
        );
        let job = jobs.get("helm-install-acme").await.unwrap();
        assert_eq!(job.data["status"]["succeeded"], 1);

        let mut bad = chart.clone();
        bad.data["spec"]["failurePolicy"] = json!("never");
        let (code, reason, message) = api_status(
            charts.patch("acme", &PatchParams::apply("hexa-coordinator"), &Patch::Apply(&bad)).await.unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (422, "Invalid"));
        assert!(message.contains("spec.failurePolicy: Unsupported value: \"never\""), "{message}");

        let deleted = charts.delete("acme", &DeleteParams::default()).await.unwrap();
        assert!(deleted.is_left());
        fake.complete_job("kube-system", "helm-delete-acme").unwrap();
        assert!(charts.get_opt("acme").await.unwrap().is_none());

        // A missing CRD: kube sees a 404 it can tell apart.
        assert!(fake.set_served("helmcharts", false) && fake.set_served("helmchartconfigs", false));
        assert_eq!(api_status(charts.list(&ListParams::default()).await.unwrap_err()).0, 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn faults_outages_and_watches_as_kube_sees_them() {
        let fake = FakeKube::start().await;
        let client = client(&fake);
        let namespaces: Api<Namespace> = Api::all(client.clone());

        fake.fail_next(Verb::Get, "namespaces", 500, 1);
        assert_eq!(api_status(namespaces.get("default").await.unwrap_err()).1, "InternalError");
        fake.fail_next(Verb::Patch, "namespaces", 403, 1);
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "hx-w"}});
        let ssa = PatchParams::apply("hexa-coordinator");
        assert_eq!(api_status(namespaces.patch("hx-w", &ssa, &Patch::Apply(&ns)).await.unwrap_err()).0, 403);

        let mut events = namespaces.watch(&WatchParams::default().timeout(10), "0").await.unwrap().boxed();
        namespaces.patch("hx-w", &ssa, &Patch::Apply(&ns)).await.unwrap();
        let mut seen = Vec::new();
        while !seen.contains(&"hx-w".to_string()) {
            match tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap() {
                WatchEvent::Added(ns) => seen.push(ns.metadata.name.unwrap_or_default()),
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(events);

        fake.set_down(true);
        let err = namespaces.get("hx-w").await.unwrap_err();
        assert!(!matches!(err, kube::Error::Api(_)), "a transport error, not an API answer: {err:?}");
        fake.set_down(false);
        assert!(namespaces.get("hx-w").await.is_ok());
    }
}
