//! The node inventory: every enrolled node with its identity and pool (persisted), its latest
//! capacity report (memory only: reports arrive every second and only their transitions matter
//! durably), its health, and its desired state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use hexa_shared::names::{Pool, node_name_from_hostname, validate_node_name};
use hexa_shared::proto::{EnrollRequest, Enrolled, ProviderIdentity, Refusal, RefusalCode};
use hexa_shared::report::{CapacityReport, Resources, Usage};
use hexa_shared::spec::{AppliedStatus, ApplyOutcome, NodeSpec, TenantAllocation};

use crate::bootstrap::{CertificateAuthority, hashes_equal, parse_token, sha256_hex};
use crate::config::K3sSettings;
use crate::metrics::Metrics;
use crate::placement;
use crate::store::{Health, NodeRecord, Store, StoreError, TokenState};
use crate::tokens::now_unix;
use hexa_shared::k3s::{ArtifactSource, JoinToken, K3sRole, K3sSpec};

/// Thresholds that turn silence into health.
#[derive(Debug, Clone, Copy)]
pub struct HealthThresholds {
    pub unreachable_after: Duration,
    pub lost_after: Duration,
}

/// The next health of a node that has been silent for `silent_for`. Only a report makes a node
/// Ready again ([`Inventory::record_report`]); a Lost node stays Lost until then, because Lost
/// triggers re-placement and must not flap back through Unreachable.
pub fn judge_health(current: Health, silent_for: Duration, thresholds: HealthThresholds) -> Health {
    if silent_for >= thresholds.lost_after {
        Health::Lost
    } else if silent_for >= thresholds.unreachable_after && current != Health::Lost {
        Health::Unreachable
    } else {
        current
    }
}

#[derive(Debug)]
struct NodeEntry {
    record: NodeRecord,
    last_report: Option<(Box<CapacityReport>, Instant)>,
    /// Silence is measured from the last report, or from enrollment / coordinator start.
    silent_since: Instant,
    links: u32,
    applied: Option<AppliedStatus>,
    spec_tx: watch::Sender<NodeSpec>,
}

/// A node as the admin API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct NodeView {
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    pub pool: Pool,
    pub health: Health,
    pub health_since_unix: i64,
    pub connected: bool,
    pub hostname: String,
    pub machine_id: String,
    pub provider: ProviderIdentity,
    pub enrolled_at_unix: i64,
    pub cert_not_after_unix: i64,
    pub cordoned: bool,
    pub node_class: Option<String>,
    /// Tenants placed on this node and their allocations (the desired state sent to it).
    pub tenants: Vec<TenantAllocation>,
    pub spec_generation: u64,
    pub applied_generation: Option<u64>,
    pub apply_error: Option<String>,
    /// Age of the latest report when this view was taken.
    pub last_report_age_ms: Option<u64>,
    pub last_report_seq: Option<u64>,
    pub capacity: Option<Resources>,
    pub allocatable: Option<Resources>,
    pub usage: Option<Usage>,
    /// K3s on the node, as its latest report says.
    pub k3s: Option<hexa_shared::k3s::K3sState>,
    /// Each tenant's use of the node, from its pods' cgroups.
    pub tenant_usage: Vec<hexa_shared::report::TenantUsage>,
}

#[derive(Debug)]
pub struct Inventory {
    store: Store,
    ca: Arc<CertificateAuthority>,
    thresholds: HealthThresholds,
    node_cert_validity: Duration,
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    metrics: Arc<Metrics>,
    k3s: K3sPlan,
    isolation: Option<IsolationPlan>,
}

/// What tenant nodes' isolation specs are derived from.
#[derive(Debug, Clone)]
pub struct IsolationPlan {
    pub pod_cidr: hexa_shared::isolation::Ipv4Cidr,
    pub management_cidrs: Vec<hexa_shared::isolation::Ipv4Cidr>,
    pub pids_per_pod: u64,
}

impl IsolationPlan {
    /// Isolation for a node of `pool` holding `tenants`, from every node's reported pods: each
    /// tenant's pod IPs cluster-wide, and kube-system's pods as system pods. Server nodes run no
    /// tenants and get none.
    fn spec_for(
        &self,
        pool: &Pool,
        tenants: &[TenantAllocation],
        nodes: &BTreeMap<String, NodeEntry>,
    ) -> Option<hexa_shared::isolation::IsolationSpec> {
        use hexa_shared::isolation::{IsolationSpec, TenantAllocation as Allocation, TenantIsolation};
        if *pool == Pool::Server {
            return None;
        }
        let mut system = std::collections::BTreeSet::new();
        let mut by_tenant: BTreeMap<&str, std::collections::BTreeSet<std::net::Ipv4Addr>> = BTreeMap::new();
        for pod in nodes.values().filter_map(|e| e.last_report.as_ref()).flat_map(|(r, _)| r.pods.iter()) {
            let Some(ip) = pod.ip.filter(|ip| self.pod_cidr.contains(*ip)) else { continue };
            if pod.namespace == "kube-system" {
                system.insert(ip);
            } else if let Some(tenant) = &pod.tenant {
                by_tenant.entry(tenant).or_default().insert(ip);
            }
        }
        let mut isolated: Vec<TenantIsolation> = Vec::new();
        for allocation in tenants {
            if isolated.iter().any(|t| t.tenant == allocation.tenant) {
                continue;
            }
            isolated.push(TenantIsolation {
                tenant: allocation.tenant.clone(),
                allocation: Allocation {
                    cpu_millis: allocation.cpu_millis,
                    memory_bytes: allocation.memory_bytes,
                    pids: u64::from(allocation.pods.max(1)) * self.pids_per_pod,
                },
                pod_ips: by_tenant.get(allocation.tenant.as_str()).cloned().unwrap_or_default(),
            });
        }
        Some(IsolationSpec {
            pod_cidr: self.pod_cidr,
            management_cidrs: self.management_cidrs.clone(),
            system_pod_ips: system,
            tenants: isolated,
        })
    }
}

/// What every node's K3s spec is derived from.
#[derive(Debug, Clone)]
pub struct K3sPlan {
    pub settings: K3sSettings,
    /// The cluster's join token. It leaves the coordinator only inside NodeSpecs, on mTLS links.
    pub token: JoinToken,
}

impl K3sPlan {
    /// K3s for `record`, given every node: the earliest-enrolled server initialises the cluster,
    /// the rest join it. `None` when K3s is not managed, or when the node must join a cluster
    /// whose address is not known yet (the first server has not connected).
    fn spec_for(&self, record: &NodeRecord, nodes: &BTreeMap<String, NodeEntry>) -> Option<K3sSpec> {
        if !self.settings.manage {
            return None;
        }
        let first_server = nodes
            .values()
            .map(|e| &e.record)
            .filter(|r| r.pool == Pool::Server)
            .min_by_key(|r| (r.enrolled_at_unix, r.name.clone()));
        let url = if self.settings.server_url.is_empty() {
            first_server.and_then(|s| s.address).map(|ip| match ip {
                std::net::IpAddr::V4(v4) => format!("https://{v4}:6443"),
                std::net::IpAddr::V6(v6) => format!("https://[{v6}]:6443"),
            })
        } else {
            Some(self.settings.server_url.clone())
        };
        let role = match (&record.pool, first_server) {
            (Pool::Server, Some(first)) if first.name == record.name => {
                K3sRole::Server { cluster_init: true, server_url: None }
            }
            (Pool::Server, _) => K3sRole::Server { cluster_init: false, server_url: Some(url?) },
            _ => K3sRole::Agent { server_url: url? },
        };
        // Registration labels and taints come from the pool only: tenant labels change often and
        // are applied through the API, where changing them restarts nothing.
        let pool_spec = NodeSpec::for_pool(&record.name, &record.pool, 0);
        let mut spec = K3sSpec::new(role);
        spec.token = Some(self.token.clone());
        spec.version = self.settings.version.clone();
        spec.node_name = Some(record.name.clone());
        spec.node_labels = pool_spec.labels;
        spec.node_taints = pool_spec.taints;
        spec.kubelet_args = self.settings.kubelet_args.clone();
        spec.artifacts = if self.settings.airgap_dir.is_empty() {
            ArtifactSource::Url { base: self.settings.artifact_base.clone() }
        } else {
            ArtifactSource::AirGap { dir: self.settings.airgap_dir.clone().into() }
        };
        Some(spec)
    }
}

fn refusal(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "state database failed during a node request");
        refusal(RefusalCode::Internal, "the coordinator could not record the request; try again")
    }
}

impl Inventory {
    /// Loads every node from the store. Nodes start Pending (Lost ones stay Lost) until they report.
    pub fn load(
        store: Store,
        ca: Arc<CertificateAuthority>,
        thresholds: HealthThresholds,
        node_cert_validity: Duration,
        metrics: Arc<Metrics>,
        k3s: K3sPlan,
        isolation: Option<IsolationPlan>,
    ) -> Result<Inventory, StoreError> {
        let now = Instant::now();
        let mut nodes = BTreeMap::new();
        for (name, mut record) in store.nodes()? {
            if record.health != Health::Lost && record.health != Health::Pending {
                record.health = Health::Pending;
                record.health_since_unix = now_unix();
                store.put_node(&record)?;
            }
            let (spec_tx, _) = watch::channel(record.spec.clone());
            nodes.insert(
                name,
                NodeEntry { record, last_report: None, silent_since: now, links: 0, applied: None, spec_tx },
            );
        }
        let inventory =
            Inventory { store, ca, thresholds, node_cert_validity, nodes: Mutex::new(nodes), metrics, k3s, isolation };
        // The K3s settings may have changed since the last run.
        inventory.respec_all(&mut inventory.nodes())?;
        Ok(inventory)
    }

    /// Recomputes `name`'s desired state from its record, `tenants` (or the ones it has) and the
    /// fleet; persists and pushes a new generation only when the content changed.
    fn respec(
        &self,
        nodes: &mut BTreeMap<String, NodeEntry>,
        name: &str,
        tenants: Option<Vec<TenantAllocation>>,
    ) -> Result<(), StoreError> {
        let Some(entry) = nodes.get(name) else { return Ok(()) };
        let current = &entry.record.spec;
        let tenants = tenants.unwrap_or_else(|| current.tenants.clone());
        let k3s = self.k3s.spec_for(&entry.record, nodes);
        let isolation = self.isolation.as_ref().and_then(|plan| plan.spec_for(&entry.record.pool, &tenants, nodes));
        let mut wanted = NodeSpec::build(name, &entry.record.pool, current.generation + 1, tenants).with_k3s(k3s);
        wanted.isolation = isolation;
        if current.same_content(&wanted) {
            return Ok(());
        }
        let mut record = entry.record.clone();
        record.spec = wanted;
        self.store.put_node(&record)?;
        tracing::info!(
            node = name,
            generation = record.spec.generation,
            tenants = record.spec.tenants.len(),
            k3s = record.spec.k3s.is_some(),
            "desired state changed"
        );
        if let Some(entry) = nodes.get_mut(name) {
            entry.spec_tx.send_replace(record.spec.clone());
            entry.record = record;
        }
        Ok(())
    }

    fn respec_all(&self, nodes: &mut BTreeMap<String, NodeEntry>) -> Result<(), StoreError> {
        let names: Vec<String> = nodes.keys().cloned().collect();
        for name in names {
            self.respec(nodes, &name, None)?;
        }
        Ok(())
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        // A panic while holding this lock would be a bug in this module; the map itself is still
        // consistent (every mutation is a single assignment), so keep serving.
        self.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a node: checks and consumes its bootstrap token, chooses its name, signs its CSR and
    /// records it, all in one transaction, so a token admits exactly one node even under races.
    pub fn enroll(&self, req: &EnrollRequest) -> Result<Enrolled, Refusal> {
        let Some((token_id, secret)) = parse_token(&req.token) else {
            return Err(refusal(
                RefusalCode::TokenUnknown,
                "the bootstrap token is not of the form <6 chars>.<16 chars>",
            ));
        };
        let base_name = match &req.requested_name {
            Some(name) => {
                validate_node_name(name).map_err(|e| refusal(RefusalCode::MalformedRequest, e.to_string()))?;
                name.clone()
            }
            None => node_name_from_hostname(&req.hostname).unwrap_or_else(|| "node".to_string()),
        };
        let now = now_unix();
        let (record, issued) = self.store.write(|tx| {
            let unknown = || {
                refusal(RefusalCode::TokenUnknown, format!("bootstrap token {token_id} is not known: mint one with `hexactl token create`"))
            };
            let mut token = tx.token(token_id)?.ok_or_else(unknown)?;
            if !hashes_equal(&token.secret_sha256, &sha256_hex(secret)) {
                return Err(unknown());
            }
            match &token.state {
                TokenState::Used { node, .. } => {
                    return Err(refusal(
                        RefusalCode::TokenUsed,
                        format!("bootstrap token {token_id} was already used by node {node}; tokens are single use: mint a new one"),
                    ));
                }
                TokenState::Revoked { .. } => {
                    return Err(refusal(RefusalCode::TokenRevoked, format!("bootstrap token {token_id} was revoked")));
                }
                TokenState::Active if token.expires_at_unix <= now => {
                    return Err(refusal(
                        RefusalCode::TokenExpired,
                        format!("bootstrap token {token_id} expired {}s ago: mint a new one", now - token.expires_at_unix),
                    ));
                }
                TokenState::Active => {}
            }
            let name = choose_name(tx, &base_name, &req.machine_id)?;
            let issued = self
                .ca
                .sign_node_csr(&req.csr_der, &name, self.node_cert_validity)
                .map_err(|e| refusal(RefusalCode::MalformedRequest, e.to_string()))?;
            let previous = tx.node(&name)?;
            let generation = previous.as_ref().map_or(0, |p| p.spec.generation) + 1;
            // A re-enrolled node keeps the tenants placed on it; a new pool's labels apply.
            let tenants = previous.as_ref().map(|p| p.spec.tenants.clone()).unwrap_or_default();
            let record = NodeRecord {
                name: name.clone(),
                pool: token.pool.clone(),
                hostname: req.hostname.clone(),
                machine_id: req.machine_id.clone(),
                provider: req.provider.clone(),
                enrolled_at_unix: now,
                token_id: token_id.to_string(),
                cert_serial: issued.serial.clone(),
                previous_cert_serial: None,
                cert_not_after_unix: issued.not_after_unix,
                health: Health::Pending,
                health_since_unix: now,
                spec: NodeSpec::build(&name, &token.pool, generation, tenants),
                cordoned: previous.as_ref().is_some_and(|p| p.cordoned),
                node_class: token.node_class.clone(),
                address: None,
            };
            tx.put_node(&record)?;
            token.state = TokenState::Used { node: name, at_unix: now };
            tx.put_token(&token)?;
            Ok((record, issued))
        })?;
        tracing::info!(node = %record.name, pool = %record.pool, token_id, hostname = %req.hostname, "node enrolled");
        let enrolled = Enrolled {
            node_name: record.name.clone(),
            pool: record.pool.clone(),
            cert_chain_der: vec![issued.cert_der.to_vec()],
            ca_der: self.ca.cert_der().to_vec(),
        };
        let mut nodes = self.nodes();
        match nodes.get_mut(&record.name) {
            // Re-enrollment of a known node: connected links keep running until they fail the
            // serial check on their next connection; the new spec reaches a new link.
            Some(entry) => {
                entry.spec_tx.send_replace(record.spec.clone());
                entry.record = record;
                entry.silent_since = Instant::now();
            }
            None => {
                let (spec_tx, _) = watch::channel(record.spec.clone());
                let entry = NodeEntry {
                    record,
                    last_report: None,
                    silent_since: Instant::now(),
                    links: 0,
                    applied: None,
                    spec_tx,
                };
                nodes.insert(entry.record.name.clone(), entry);
            }
        }
        // A new server can change who joins where; anyone else only needs its own K3s spec.
        let result = if enrolled.pool == Pool::Server {
            self.respec_all(&mut nodes)
        } else {
            self.respec(&mut nodes, &enrolled.node_name, None)
        };
        result.map_err(Refusal::from)?;
        Ok(enrolled)
    }

    /// Checks that `serial` is the certificate `name` must present, and returns its pool and a
    /// subscription to its desired state.
    pub fn admit_link(
        &self,
        name: &str,
        serial: &str,
        address: std::net::IpAddr,
    ) -> Result<(Pool, watch::Receiver<NodeSpec>), Refusal> {
        let mut nodes = self.nodes();
        let entry = nodes.get_mut(name).ok_or_else(|| {
            refusal(RefusalCode::CertificateSuperseded, format!("node {name} is not enrolled here; enroll it again"))
        })?;
        if entry.record.cert_serial == serial {
            if entry.record.previous_cert_serial.is_some() {
                // The node uses its renewed certificate: the old one is retired for good.
                entry.record.previous_cert_serial = None;
                self.store.put_node(&entry.record)?;
            }
        } else if entry.record.previous_cert_serial.as_deref() != Some(serial) {
            return Err(refusal(
                RefusalCode::CertificateSuperseded,
                format!(
                    "this certificate of node {name} has been superseded (node re-enrolled or renewed); enroll again"
                ),
            ));
        }
        entry.links += 1;
        let admitted = (entry.record.pool.clone(), entry.spec_tx.subscribe());
        if entry.record.address != Some(address) {
            entry.record.address = Some(address);
            self.store.put_node(&entry.record)?;
            if entry.record.pool == Pool::Server {
                // The first server's address is where the others join.
                self.respec_all(&mut nodes)?;
            }
        }
        Ok(admitted)
    }

    pub fn link_closed(&self, name: &str) {
        if let Some(entry) = self.nodes().get_mut(name) {
            entry.links = entry.links.saturating_sub(1);
        }
    }

    /// Records a report for `name`, the identity of the connection it arrived on; whatever name the
    /// report itself carries is ignored.
    pub fn record_report(&self, name: &str, report: CapacityReport) {
        let now = Instant::now();
        let mut nodes = self.nodes();
        let Some(entry) = nodes.get_mut(name) else { return };
        let pods_changed = entry.last_report.as_ref().is_none_or(|(previous, _)| previous.pods != report.pods);
        entry.last_report = Some((Box::new(report), now));
        entry.silent_since = now;
        self.metrics.reports.inc();
        if entry.record.health != Health::Ready {
            self.transition(entry, Health::Ready);
        }
        // Tenants' IP sets are cluster-wide: a node's new pods change other nodes' isolation too.
        if pods_changed && self.isolation.is_some() {
            if let Err(e) = self.respec_all(&mut nodes) {
                tracing::error!(node = name, error = %e, "cannot update isolation after a pod change");
            }
        }
    }

    pub fn record_applied(&self, name: &str, status: AppliedStatus) {
        if let Some(entry) = self.nodes().get_mut(name) {
            if let ApplyOutcome::Failed { reason } = &status.outcome {
                tracing::warn!(node = name, generation = status.generation, reason, "node could not apply its spec");
            }
            entry.applied = Some(status);
        }
    }

    /// Signs a renewal CSR for `name` and makes the new certificate the current one.
    pub fn renew(&self, name: &str, csr_der: &[u8]) -> Result<Vec<Vec<u8>>, Refusal> {
        let issued = self
            .ca
            .sign_node_csr(csr_der, name, self.node_cert_validity)
            .map_err(|e| refusal(RefusalCode::MalformedRequest, e.to_string()))?;
        let mut nodes = self.nodes();
        let entry = nodes
            .get_mut(name)
            .ok_or_else(|| refusal(RefusalCode::CertificateSuperseded, format!("node {name} is no longer enrolled")))?;
        let mut record = entry.record.clone();
        record.previous_cert_serial = Some(record.cert_serial.clone());
        record.cert_serial = issued.serial.clone();
        record.cert_not_after_unix = issued.not_after_unix;
        self.store.put_node(&record)?;
        entry.record = record;
        tracing::info!(node = name, serial = %issued.serial, not_after_unix = issued.not_after_unix, "node certificate renewed");
        Ok(vec![issued.cert_der.to_vec()])
    }

    fn transition(&self, entry: &mut NodeEntry, to: Health) {
        let from = entry.record.health;
        let mut record = entry.record.clone();
        record.health = to;
        record.health_since_unix = now_unix();
        // Persist first: the in-memory state never claims a transition the disk does not have.
        match self.store.put_node(&record) {
            Ok(()) => {
                tracing::info!(node = %record.name, %from, %to, "node health changed");
                entry.record = record;
            }
            Err(e) => tracing::error!(node = %record.name, %from, %to, error = %e, "cannot persist health change"),
        }
    }

    /// Re-judges every node's health at `now`.
    pub fn tick(&self, now: Instant) {
        let mut nodes = self.nodes();
        for entry in nodes.values_mut() {
            let silent_for = now.saturating_duration_since(entry.silent_since);
            let next = judge_health(entry.record.health, silent_for, self.thresholds);
            if next != entry.record.health {
                self.transition(entry, next);
            }
        }
    }

    fn view_of(entry: &NodeEntry, now: Instant) -> NodeView {
        let report = entry.last_report.as_ref();
        let (applied_generation, apply_error) = match &entry.applied {
            Some(AppliedStatus { generation, outcome: ApplyOutcome::Applied }) => (Some(*generation), None),
            Some(AppliedStatus { generation: _, outcome: ApplyOutcome::Failed { reason } }) => {
                (report.map(|(r, _)| r.applied_generation), Some(reason.clone()))
            }
            None => (report.map(|(r, _)| r.applied_generation), None),
        };
        NodeView {
            name: entry.record.name.clone(),
            pool: entry.record.pool.clone(),
            health: entry.record.health,
            health_since_unix: entry.record.health_since_unix,
            connected: entry.links > 0,
            hostname: entry.record.hostname.clone(),
            machine_id: entry.record.machine_id.clone(),
            provider: entry.record.provider.clone(),
            enrolled_at_unix: entry.record.enrolled_at_unix,
            cert_not_after_unix: entry.record.cert_not_after_unix,
            cordoned: entry.record.cordoned,
            node_class: entry.record.node_class.clone(),
            tenants: entry.record.spec.tenants.clone(),
            spec_generation: entry.record.spec.generation,
            applied_generation,
            apply_error,
            last_report_age_ms: report.map(|(_, at)| now.saturating_duration_since(*at).as_millis() as u64),
            last_report_seq: report.map(|(r, _)| r.seq),
            capacity: report.map(|(r, _)| r.capacity),
            allocatable: report.map(|(r, _)| r.allocatable),
            usage: report.map(|(r, _)| r.usage),
            k3s: report.map(|(r, _)| r.k3s.clone()),
            tenant_usage: report.map(|(r, _)| r.tenant_usage.clone()).unwrap_or_default(),
        }
    }

    pub fn list(&self) -> Vec<NodeView> {
        let now = Instant::now();
        self.nodes().values().map(|e| Self::view_of(e, now)).collect()
    }

    pub fn get(&self, name: &str) -> Option<NodeView> {
        self.nodes().get(name).map(|e| Self::view_of(e, Instant::now()))
    }

    /// Cordons or uncordons a node (persisted). `None` when there is no such node.
    pub fn set_cordoned(&self, name: &str, cordoned: bool) -> Result<Option<NodeView>, StoreError> {
        let mut nodes = self.nodes();
        let Some(entry) = nodes.get_mut(name) else { return Ok(None) };
        if entry.record.cordoned != cordoned {
            let mut record = entry.record.clone();
            record.cordoned = cordoned;
            self.store.put_node(&record)?;
            entry.record = record;
            tracing::info!(node = name, cordoned, "node schedulability changed");
        }
        Ok(Some(Self::view_of(entry, Instant::now())))
    }

    /// Makes `tenants` the allocations in `name`'s desired state. The spec gets a new generation
    /// (persisted, then pushed to the node) only when its content changes.
    pub fn set_tenants(&self, name: &str, tenants: Vec<TenantAllocation>) -> Result<(), StoreError> {
        self.respec(&mut self.nodes(), name, Some(tenants))
    }

    /// Every node as placement sees it: Ready or not, cordoned or not, allocatable and live
    /// MemAvailable from its latest report (zero before the first one).
    pub fn placement_views(&self) -> Vec<placement::NodeView> {
        self.nodes()
            .values()
            .map(|entry| {
                let report = entry.last_report.as_ref().map(|(r, _)| r);
                placement::NodeView {
                    name: entry.record.name.clone(),
                    pool: placement::NodePool::from_pool(&entry.record.pool, entry.record.node_class.clone()),
                    ready: entry.record.health == Health::Ready,
                    schedulable: !entry.record.cordoned,
                    allocatable: report.map(|r| r.allocatable).unwrap_or_default(),
                    memory_available_bytes: report.map_or(0, |r| r.usage.memory_available_bytes),
                }
            })
            .collect()
    }

    /// Names of nodes whose health is Lost.
    pub fn lost_nodes(&self) -> Vec<String> {
        self.nodes().values().filter(|e| e.record.health == Health::Lost).map(|e| e.record.name.clone()).collect()
    }

    pub fn health_counts(&self) -> BTreeMap<Health, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.nodes().values() {
            *counts.entry(entry.record.health).or_default() += 1;
        }
        counts
    }
}

/// `base`, or `base-2`, `base-3`... when another machine holds it. The same machine enrolling
/// again gets its old name back (a re-imaged node keeps its identity).
fn choose_name(tx: &crate::store::Tx<'_>, base: &str, machine_id: &str) -> Result<String, Refusal> {
    for n in 1u32.. {
        let candidate = if n == 1 { base.to_string() } else { format!("{}-{n}", truncate(base, 56)) };
        match tx.node(&candidate)? {
            None => return Ok(candidate),
            Some(existing) if existing.machine_id == machine_id && !machine_id.is_empty() => return Ok(candidate),
            Some(_) => {}
        }
    }
    Err(refusal(RefusalCode::Internal, "no free node name"))
}

fn truncate(s: &str, n: usize) -> &str {
    &s[..s.len().min(n)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: HealthThresholds =
        HealthThresholds { unreachable_after: Duration::from_secs(3), lost_after: Duration::from_secs(30) };

    #[test]
    fn silence_turns_into_health() {
        let table = [
            (Health::Ready, 0, Health::Ready),
            (Health::Ready, 2, Health::Ready),
            (Health::Ready, 3, Health::Unreachable),
            (Health::Unreachable, 29, Health::Unreachable),
            (Health::Unreachable, 30, Health::Lost),
            (Health::Pending, 1, Health::Pending),
            (Health::Pending, 5, Health::Unreachable),
            (Health::Lost, 5, Health::Lost),
            (Health::Lost, 0, Health::Lost),
        ];
        for (current, secs, want) in table {
            assert_eq!(judge_health(current, Duration::from_secs(secs), T), want, "{current:?} after {secs}s");
        }
    }
}
