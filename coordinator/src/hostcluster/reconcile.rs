//! Realises tenants on the host K3s cluster, or writes the same objects as manifests.
//!
//! Each pass compares what the tenants need (namespace, HelmChart, node labels and taints) with
//! what the cluster has, and server-side applies (field manager `hexa-coordinator`) only what
//! differs: an object is left alone when it carries the hash of exactly what we would apply and
//! still holds every field of it, so a pass with nothing to change sends no write, also after a
//! restart. Errors become the tenant's `Deployed` condition, with the reason, and the tenant is
//! retried with backoff; nothing here ever stops the coordinator.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use hexa_shared::names::{tenant_label, tenant_namespace};
use hexa_shared::tenant::{NodeClass, Phase, Tenant, reasons};

use super::helmchart::HelmChart;
use super::render::{self, FIELD_MANAGER, HELM_CHART_NAMESPACE, Mode, NodeMarks, RenderSettings};
use crate::tenants::Tenants;

/// Annotation holding the sha256 of what we last applied to an object.
pub const APPLIED_ANNOTATION: &str = "hexabase.ai/applied-sha256";
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HostClusterError {
    #[error("host cluster kubeconfig: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("manifests directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    InstallFailed(String),
}

impl HostClusterError {
    /// The condition reason and the sentence a person reads.
    pub fn condition(&self) -> (&'static str, String) {
        match self {
            HostClusterError::Kube { what, source: kube::Error::Api(status) } => match status.code {
                404 if what.contains("HelmChart") => (
                    "CrdMissing",
                    format!(
                        "{what}: the API server does not serve helm.cattle.io/v1 HelmChart; is the host cluster K3s with its helm-controller? ({})",
                        status.message
                    ),
                ),
                403 => (
                    "Forbidden",
                    format!(
                        "{what}: the coordinator's credentials are not allowed to ({}); grant it in the host cluster's RBAC",
                        status.message
                    ),
                ),
                409 => ("Conflict", format!("{what}: {}", status.message)),
                422 => ("Invalid", format!("{what}: the API server refused the object: {}", status.message)),
                code if code >= 500 => {
                    ("ApiServerError", format!("{what}: the API server failed ({code}): {}", status.message))
                }
                code => ("ApiError", format!("{what}: HTTP {code}: {}", status.message)),
            },
            HostClusterError::Kube { what, source } => {
                ("ApiServerUnreachable", format!("{what}: cannot reach the host cluster's API server: {source}"))
            }
            HostClusterError::InstallFailed(message) => (reasons::DEPLOY_FAILED, message.clone()),
            other => ("RenderFailed", other.to_string()),
        }
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> HostClusterError {
    let what = what.into();
    move |source| HostClusterError::Kube { what, source }
}

/// Where a pass's objects go. In `Kube` mode the client may come later (see [`super::access`]).
#[derive(Debug)]
enum Target {
    Kube,
    Manifests(PathBuf),
    Off,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// Objects created, changed or deleted (API writes, or files written or removed).
    pub writes: u64,
    /// Tenants whose objects could not be brought in line.
    pub failures: u64,
}

#[derive(Debug)]
pub struct HostCluster {
    tenants: Arc<Tenants>,
    settings: RenderSettings,
    classes: Vec<NodeClass>,
    target: Target,
    /// The host cluster's client, in mode `apply`, once there is one.
    client: tokio::sync::watch::Sender<Option<ClientSlot>>,
    /// While there is none: what tenants wait for, in their `Deployed` condition.
    waiting_for: std::sync::Mutex<String>,
    writes: AtomicU64,
    /// Per tenant: failed attempts in a row and when to try again.
    backoff: Mutex<HashMap<String, (u32, Instant)>>,
}

/// A client, and where its credentials came from.
#[derive(Clone)]
struct ClientSlot {
    client: kube::Client,
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSlot")
    }
}

fn helm_chart_resource() -> ApiResource {
    ApiResource::erase::<HelmChart>(&())
}

fn core_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn hash_of(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

/// True when every field of `desired` is in `live` with the same value.
fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        (Value::Object(l), Value::Object(d)) => d.iter().all(|(k, dv)| l.get(k).is_some_and(|lv| contains(lv, dv))),
        (Value::Array(l), Value::Array(d)) => l.len() == d.len() && l.iter().zip(d).all(|(lv, dv)| contains(lv, dv)),
        (l, d) => l == d,
    }
}

impl HostCluster {
    /// Connects to the host cluster (mode `apply`) or prepares the manifests directory. In mode
    /// `apply` the credentials are the operator's `kubeconfig` (refused when unusable), one found
    /// as kubectl finds it, or the access a server node minted earlier, kept at `stored`; with
    /// none of them the coordinator starts without a client and tenants wait until
    /// [`HostCluster::set_client`] (see [`super::access::Bootstrap`]).
    pub async fn new(
        settings: RenderSettings,
        classes: Vec<NodeClass>,
        tenants: Arc<Tenants>,
        stored: &Path,
    ) -> Result<HostCluster, HostClusterError> {
        let (target, client) = match settings.mode {
            Mode::Off => (Target::Off, None),
            Mode::Manifests => (Target::Manifests(settings.manifests_dir.clone()), None),
            Mode::Apply if !settings.kubeconfig.is_empty() => {
                let client = super::access::client_from(Path::new(&settings.kubeconfig))
                    .await
                    .map_err(HostClusterError::Config)?;
                (Target::Kube, Some(client))
            }
            Mode::Apply => (Target::Kube, Self::found_client(stored).await),
        };
        let waiting_for = match (&target, &client) {
            (Target::Kube, None) => {
                tracing::info!("no host-cluster kubeconfig: tenants wait until a server node's K3s gives access");
                "no kubeconfig is configured, and no server node runs K3s yet; access to the host cluster is \
                 fetched from the first server node whose K3s runs"
            }
            _ => "",
        };
        Ok(HostCluster {
            tenants,
            settings,
            classes,
            target,
            client: tokio::sync::watch::Sender::new(client.map(|client| ClientSlot { client })),
            waiting_for: std::sync::Mutex::new(waiting_for.to_string()),
            writes: AtomicU64::new(0),
            backoff: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials as kubectl finds them, else those a server node minted before (`stored`).
    async fn found_client(stored: &Path) -> Option<kube::Client> {
        if let Ok(config) = kube::Config::infer().await {
            match kube::Client::try_from(config) {
                Ok(client) => return Some(client),
                Err(e) => tracing::warn!(error = %e, "the kubeconfig found as kubectl finds it is unusable"),
            }
        }
        if !stored.exists() {
            return None;
        }
        match super::access::client_from(stored).await {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "the host-cluster access kept from a server node is unusable; fetching it again");
                None
            }
        }
    }

    /// Builds a reconciler on an existing client (tests point it at a fake API server).
    pub fn with_client(
        client: kube::Client,
        settings: RenderSettings,
        classes: Vec<NodeClass>,
        tenants: Arc<Tenants>,
    ) -> HostCluster {
        HostCluster {
            tenants,
            settings,
            classes,
            target: Target::Kube,
            client: tokio::sync::watch::Sender::new(Some(ClientSlot { client })),
            waiting_for: std::sync::Mutex::new(String::new()),
            writes: AtomicU64::new(0),
            backoff: Mutex::new(HashMap::new()),
        }
    }

    /// True in mode `apply` while there is no client yet.
    pub fn needs_access(&self) -> bool {
        matches!(self.target, Target::Kube) && self.client.borrow().is_none()
    }

    /// Gives the reconciler the client it waited for (mode `apply` only).
    pub fn set_client(&self, client: kube::Client) {
        if matches!(self.target, Target::Kube) {
            self.client.send_replace(Some(ClientSlot { client }));
        }
    }

    /// Says what tenants wait for while there is no client.
    pub fn set_waiting_for(&self, why: &str) {
        *self.waiting_for.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
    }

    /// Resolves once there is a client (at once if there is one); never in modes without one.
    pub async fn wait_for_client(&self) -> kube::Client {
        let mut changes = self.client.subscribe();
        loop {
            if let Some(slot) = changes.borrow_and_update().clone() {
                return slot.client;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The host cluster's API client, in mode `apply`.
    pub fn client(&self) -> Option<kube::Client> {
        self.client.borrow().as_ref().map(|slot| slot.client.clone())
    }

    /// Writes made since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// One pass over every tenant.
    pub async fn reconcile(&self) -> PassReport {
        let before = self.writes();
        let failures = match &self.target {
            Target::Off => 0,
            Target::Manifests(dir) => self.write_manifests(dir).await,
            Target::Kube => match self.client() {
                Some(client) => self.apply_pass(&client).await,
                None => self.waiting_pass().await,
            },
        };
        PassReport { writes: self.writes() - before, failures }
    }

    async fn due(&self, tenant: &str) -> bool {
        self.backoff.lock().await.get(tenant).is_none_or(|(_, at)| *at <= Instant::now())
    }

    async fn record_outcome(&self, tenant: &str, failed: bool) {
        let mut backoff = self.backoff.lock().await;
        if failed {
            let entry = backoff.entry(tenant.to_string()).or_insert((0, Instant::now()));
            entry.0 += 1;
            let delay = Duration::from_secs(1u64 << entry.0.min(6)).min(MAX_BACKOFF);
            entry.1 = Instant::now() + delay;
        } else {
            backoff.remove(tenant);
        }
    }

    /// Mode `apply` with no client yet: placed tenants say what they wait for; nothing fails.
    async fn waiting_pass(&self) -> u64 {
        let why = self.waiting_for.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let message = format!("waiting for the host cluster: {why}");
        for tenant in self.tenants.list().await.iter().filter(|t| !t.placement.is_empty() && t.phase != Phase::Deleting)
        {
            let waiting = Err((reasons::WAITING_FOR_HOST_CLUSTER, message.as_str()));
            if let Err(e) = self.tenants.set_realization(&tenant.name, waiting, false).await {
                tracing::error!(tenant = %tenant.name, error = %e, "cannot record the tenant's status");
            }
        }
        0
    }

    async fn apply_pass(&self, client: &kube::Client) -> u64 {
        let all = self.tenants.list().await;
        let (deleting, live): (Vec<Tenant>, Vec<Tenant>) = all.into_iter().partition(|t| t.phase == Phase::Deleting);
        let mut failures = 0;
        for tenant in live.iter().filter(|t| !t.placement.is_empty()) {
            if !self.due(&tenant.name).await {
                continue;
            }
            let outcome = self.realize(client, tenant).await;
            let failed = outcome.is_err();
            let result = match &outcome {
                Ok(ready) => {
                    self.tenants.set_realization(&tenant.name, Ok("namespace and HelmChart applied"), *ready).await
                }
                Err(e) => {
                    let (reason, message) = e.condition();
                    tracing::warn!(tenant = %tenant.name, reason, %message, "cannot realise tenant; will retry");
                    self.tenants.set_realization(&tenant.name, Err((reason, &message)), false).await
                }
            };
            if let Err(e) = result {
                tracing::error!(tenant = %tenant.name, error = %e, "cannot record the tenant's status");
            }
            self.record_outcome(&tenant.name, failed).await;
            failures += u64::from(failed);
        }
        match render::merge_node_marks(live.iter()) {
            Ok(marks) => {
                if let Err(e) = self.mark_nodes(client, &marks).await {
                    let (reason, message) = e.condition();
                    tracing::warn!(reason, %message, "cannot update node labels and taints; will retry");
                    failures += 1;
                }
            }
            Err(e) => tracing::error!(error = %e, "placement claims a node twice; node marks left as they are"),
        }
        for tenant in &deleting {
            match self.tear_down(client, &tenant.name).await {
                Ok(true) => {
                    if let Err(e) = self.tenants.forget(&tenant.name).await {
                        tracing::error!(tenant = %tenant.name, error = %e, "cannot forget the deleted tenant");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    let (reason, message) = e.condition();
                    tracing::warn!(tenant = %tenant.name, reason, %message, "cannot remove tenant's objects; will retry");
                    failures += 1;
                }
            }
        }
        failures
    }

    /// Server-side applies `desired` unless the live object already is what we would make it.
    async fn ensure(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        mut desired: Value,
        what: &str,
    ) -> Result<(), HostClusterError> {
        let hash = hash_of(&desired);
        if let Some(live) = api.get_opt(name).await.map_err(kube_err(format!("reading {what}")))? {
            let live = serde_json::to_value(&live).unwrap_or_default();
            let applied = live.pointer(&format!("/metadata/annotations/{}", APPLIED_ANNOTATION.replace('/', "~1")));
            if applied.and_then(Value::as_str) == Some(hash.as_str()) && contains(&live, &desired) {
                return Ok(());
            }
        }
        desired["metadata"]["annotations"][APPLIED_ANNOTATION] = json!(hash);
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
            .await
            .map_err(kube_err(format!("applying {what}")))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(object = what, "applied");
        Ok(())
    }

    /// Applies a tenant's namespace and HelmChart; returns whether its vCluster is up.
    async fn realize(&self, client: &kube::Client, tenant: &Tenant) -> Result<bool, HostClusterError> {
        let namespace = tenant_namespace(&tenant.name);
        let release = render::release_name(&tenant.name);
        let namespaces = Api::<DynamicObject>::all_with(client.clone(), &core_resource("Namespace", "namespaces"));
        let ns = serde_json::to_value(render::namespace(tenant, &self.settings)).unwrap_or_default();
        self.ensure(&namespaces, &namespace, ns, &format!("Namespace {namespace}")).await?;
        let charts =
            Api::<DynamicObject>::namespaced_with(client.clone(), HELM_CHART_NAMESPACE, &helm_chart_resource());
        let chart =
            serde_json::to_value(render::helm_chart(tenant, &self.classes, &self.settings)?).unwrap_or_default();
        self.ensure(&charts, &release, chart, &format!("HelmChart {HELM_CHART_NAMESPACE}/{release}")).await?;

        // The helm-controller runs helm-install-<chart> in the chart's namespace.
        let jobs = Api::<Job>::namespaced(client.clone(), HELM_CHART_NAMESPACE);
        let job_name = format!("helm-install-{release}");
        let job = jobs.get_opt(&job_name).await.map_err(kube_err(format!("reading Job {job_name}")))?;
        let conditions = job.and_then(|j| j.status).and_then(|s| s.conditions).unwrap_or_default();
        if let Some(failed) = conditions.iter().find(|c| c.type_ == "Failed" && c.status == "True") {
            return Err(HostClusterError::InstallFailed(format!(
                "the install Job {job_name} failed: {}; see `kubectl -n {HELM_CHART_NAMESPACE} logs job/{job_name}`",
                failed.message.clone().unwrap_or_default()
            )));
        }
        let installed = conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True");
        if !installed {
            return Ok(false);
        }
        let sets = Api::<StatefulSet>::namespaced(client.clone(), &namespace);
        let set =
            sets.get_opt(&release).await.map_err(kube_err(format!("reading StatefulSet {namespace}/{release}")))?;
        Ok(set.is_some_and(|s| {
            let wanted = s.spec.and_then(|spec| spec.replicas).unwrap_or(1);
            s.status.and_then(|st| st.ready_replicas).unwrap_or(0) >= wanted.max(1)
        }))
    }

    /// Brings every node's labels and taints of ours in line with `marks`; nodes not in `marks`
    /// lose whatever of ours they carry.
    async fn mark_nodes(
        &self,
        client: &kube::Client,
        marks: &BTreeMap<String, NodeMarks>,
    ) -> Result<(), HostClusterError> {
        let nodes = Api::<DynamicObject>::all_with(client.clone(), &core_resource("Node", "nodes"));
        let listed = nodes.list(&ListParams::default()).await.map_err(kube_err("listing Nodes"))?;
        let empty = NodeMarks::default();
        for node in listed.items {
            let Some(name) = node.metadata.name.clone() else { continue };
            let live = serde_json::to_value(&node).unwrap_or_default();
            let want = marks.get(&name).unwrap_or(&empty);
            let live_labels: BTreeMap<String, String> = live["metadata"]["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| render::is_managed_label(k))
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let live_taints: Vec<Value> = live["spec"]["taints"]
                .as_array()
                .map(|t| {
                    t.iter().filter(|t| t["key"].as_str().is_some_and(render::is_managed_taint)).cloned().collect()
                })
                .unwrap_or_default();
            let want_taints: Vec<Value> = want
                .taints
                .iter()
                .map(|t| json!({"key": t.key, "value": t.value, "effect": format!("{:?}", t.effect)}))
                .collect();
            if live_labels == want.labels && live_taints == want_taints {
                continue;
            }
            let patch = serde_json::to_value(render::node_patch(&name, want)).unwrap_or_default();
            nodes
                .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
                .await
                .map_err(kube_err(format!("labelling Node {name}")))?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(node = %name, labels = want.labels.len(), taints = want.taints.len(), "node marks applied");
        }
        Ok(())
    }

    /// Removes a deleted tenant's HelmChart (its delete Job runs first), then its namespace.
    /// Returns true once nothing of the tenant is left, node marks included.
    async fn tear_down(&self, client: &kube::Client, tenant: &str) -> Result<bool, HostClusterError> {
        let release = render::release_name(tenant);
        let namespace = tenant_namespace(tenant);
        let charts =
            Api::<DynamicObject>::namespaced_with(client.clone(), HELM_CHART_NAMESPACE, &helm_chart_resource());
        if let Some(chart) = charts.get_opt(&release).await.map_err(kube_err(format!("reading HelmChart {release}")))? {
            if chart.metadata.deletion_timestamp.is_none() {
                charts
                    .delete(&release, &DeleteParams::default())
                    .await
                    .map_err(kube_err(format!("deleting HelmChart {release}")))?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(tenant, "HelmChart deleted; waiting for the helm-controller to uninstall");
            }
            return Ok(false);
        }
        let namespaces = Api::<DynamicObject>::all_with(client.clone(), &core_resource("Namespace", "namespaces"));
        if let Some(ns) =
            namespaces.get_opt(&namespace).await.map_err(kube_err(format!("reading Namespace {namespace}")))?
        {
            if ns.metadata.deletion_timestamp.is_none() {
                namespaces
                    .delete(&namespace, &DeleteParams::default())
                    .await
                    .map_err(kube_err(format!("deleting Namespace {namespace}")))?;
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(false);
        }
        let nodes = Api::<DynamicObject>::all_with(client.clone(), &core_resource("Node", "nodes"));
        let label = tenant_label(tenant);
        let marked = nodes.list(&ListParams::default().labels(&label)).await.map_err(kube_err("listing Nodes"))?;
        Ok(marked.items.is_empty())
    }

    /// The `manifests` mode: the same objects as YAML files, written only when they change.
    async fn write_manifests(&self, dir: &Path) -> u64 {
        let all = self.tenants.list().await;
        let (deleting, live): (Vec<Tenant>, Vec<Tenant>) = all.into_iter().partition(|t| t.phase == Phase::Deleting);
        let mut wanted: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut failures = 0;
        for tenant in live.iter().filter(|t| !t.placement.is_empty()) {
            match render::manifests(tenant, &self.classes, &self.settings) {
                Ok(files) => {
                    wanted.extend(files.into_iter().map(|(name, text)| (dir.join(name), text)));
                    let message = format!("written to {}", dir.join("tenants").join(&tenant.name).display());
                    if let Err(e) = self.tenants.set_realization(&tenant.name, Ok(&message), false).await {
                        tracing::error!(tenant = %tenant.name, error = %e, "cannot record the tenant's status");
                    }
                }
                Err(e) => {
                    failures += 1;
                    let _ =
                        self.tenants.set_realization(&tenant.name, Err(("RenderFailed", &e.to_string())), false).await;
                }
            }
        }
        match render::merge_node_marks(live.iter()).and_then(|marks| render::node_manifests(&marks)) {
            Ok(files) => wanted.extend(files.into_iter().map(|(name, text)| (dir.join(name), text))),
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "cannot render node manifests");
            }
        }
        if let Err(e) = self.sync_files(dir, &wanted) {
            failures += 1;
            tracing::error!(error = %e, "cannot write manifests");
            return failures;
        }
        for tenant in deleting {
            if let Err(e) = self.tenants.forget(&tenant.name).await {
                tracing::error!(tenant = %tenant.name, error = %e, "cannot forget the deleted tenant");
            }
        }
        failures
    }

    /// Makes the files under `dir/tenants` and `dir/nodes` exactly `wanted`.
    fn sync_files(&self, dir: &Path, wanted: &BTreeMap<PathBuf, String>) -> Result<(), HostClusterError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HostClusterError::Io { path, source }
        };
        for (path, text) in wanted {
            if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            hexa_shared::fsutil::write_atomic(path, text.as_bytes(), hexa_shared::fsutil::PUBLIC_MODE)
                .map_err(|e| HostClusterError::Io { path: path.clone(), source: e.source })?;
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        for sub in ["tenants", "nodes"] {
            let root = dir.join(sub);
            let Ok(entries) = walk(&root) else { continue };
            for file in entries {
                if !wanted.contains_key(&file) {
                    std::fs::remove_file(&file).map_err(io(&file))?;
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    if let Some(parent) = file.parent().filter(|p| *p != root) {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
        }
        Ok(())
    }
}

fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_compares_what_we_set_and_ignores_the_rest() {
        let live =
            json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}, "uid": "u"}, "spec": {"l": [1, 2]}});
        assert!(contains(&live, &json!({"metadata": {"labels": {"x": "1"}}})));
        assert!(!contains(&live, &json!({"metadata": {"labels": {"x": "2"}}})));
        assert!(!contains(&live, &json!({"spec": {"l": [1]}})));
        assert!(!contains(&live, &json!({"spec": {"m": 1}})));
        assert_ne!(hash_of(&json!({"a": 1})), hash_of(&json!({"a": 2})));
    }
}
