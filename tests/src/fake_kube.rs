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
//! - get, list (label and field selectors, `limit`/`continue`), watch (`?watch=true`, from a
//!   `resourceVersion` or from the current state as `ADDED` events; one JSON event per line;
//!   `410 Expired` as an `ERROR` event for a version older than the kept history, which
//!   [`FakeKube::compact`] drops as etcd's compaction does), create, replace, patch
//!   (server-side apply, JSON merge patch, JSON patch), delete, deletecollection; the `status`
//!   subresource and `namespaces/<name>/finalize`;
//! - ServiceAccount tokens and RBAC: a request with a bearer token is the ServiceAccount whose
//!   token Secret (filled by the fake token controller) holds it, and may do only what its
//!   ClusterRoles grant; a request without credentials is the cluster's admin;
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
//! [`FakeKube::make_statefulset_ready`] move things on; [`FakeKube::add_node`] and
//! [`FakeKube::add_pod`] play the kubelet, the node IPAM and the scheduler. Faults are programmed with
//! [`FakeKube::fail_next`], [`FakeKube::fail_all`], [`FakeKube::set_down`] and
//! [`FakeKube::set_latency`].

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::runtime::Handle;
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

mod apply;
mod auth;
mod controllers;
mod discovery;
mod errors;
mod http;
mod selectors;
mod store;
mod types;
mod validation;
mod verbs;
mod watch;

pub use auth::{SERVICE_ACCOUNT_NAME_ANNOTATION, SERVICE_ACCOUNT_TOKEN_TYPE};
pub use types::*;

use http::{Shared, bind, spawn_server};
use store::Key;

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

    /// A node named `name` with `labels`, registered as the K3s agent does (manager `k3s`). Its
    /// `spec.podCIDR` is the first `/24` of `10.42.0.0/16` no other node has, as the controller
    /// manager's node IPAM hands them out; a node registered again keeps its range.
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)]) -> Result<Value, String> {
        let existing = self.object("nodes", "", name);
        let kept = existing.as_ref().and_then(|n| n["spec"]["podCIDR"].as_str().map(str::to_string));
        let pod_cidr = match kept {
            Some(range) => range,
            None => {
                let taken: Vec<String> = self
                    .list("nodes", None)
                    .iter()
                    .filter_map(|n| n["spec"]["podCIDR"].as_str().map(str::to_string))
                    .collect();
                (0..=255u8)
                    .map(|third| format!("10.42.{third}.0/24"))
                    .find(|range| !taken.contains(range))
                    .ok_or_else(|| "every /24 of 10.42.0.0/16 is taken".to_string())?
            }
        };
        self.add_node_with_pod_cidr(name, labels, &pod_cidr)
    }

    /// [`FakeKube::add_node`] with the pod range `pod_cidr`.
    pub fn add_node_with_pod_cidr(&self, name: &str, labels: &[(&str, &str)], pod_cidr: &str) -> Result<Value, String> {
        let mut all: Map<String, Value> = Map::new();
        all.insert("kubernetes.io/hostname".into(), json!(name));
        all.insert("kubernetes.io/os".into(), json!("linux"));
        for (k, v) in labels {
            all.insert(k.to_string(), json!(v));
        }
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": all},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}
        });
        self.upsert("nodes", node, "k3s")
    }

    /// A running pod `namespace/name` bound to `node` with the address `ip`, as the scheduler
    /// (`spec.nodeName`) and then the node's kubelet (`status`) write it. The namespace is created
    /// when missing.
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str, ip: &str) -> Result<Value, String> {
        if self.object("namespaces", "", namespace).is_none() {
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            self.upsert("namespaces", ns, "kubectl")?;
        }
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        });
        self.upsert("pods", pod, "kubelet")
    }

    /// Forgets every watch event so far, as etcd's compaction does: a watch that resumes from a
    /// resourceVersion before now gets `410 Gone` (an `ERROR` event with reason `Expired`) and
    /// must list again. Watches that are open keep going.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.events.clear();
        st.events_floor = st.rv;
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

#[cfg(test)]
mod tests;

/// The same server through the real `kube` client: its requests, its parsing of answers and of
/// `Status` errors, discovery, and what it sees when the server goes away.
#[cfg(test)]
mod kube_client_tests;
