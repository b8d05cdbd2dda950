//! The node inventory: every enrolled node with its identity and pool (persisted), its latest
//! capacity report (memory only: reports arrive every second and only their transitions matter
//! durably), its health, and its desired state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use hexa_shared::clock::now_unix;
use hexa_shared::names::Pool;
use hexa_shared::proto::{EnrollRequest, Enrolled, Refusal, RefusalCode};
use hexa_shared::report::CapacityReport;
use hexa_shared::spec::{AppliedStatus, ApplyOutcome, NodeSpec, TenantAllocation};

use crate::bootstrap::CertificateAuthority;
use crate::desired::{self, Fleet, Plans};
use crate::enroll::{Enroller, refusal};
use crate::metrics::{Metrics, NodeFigures, ReportedFigures};
use crate::placement;
use crate::pod_owners::{Changes, OwnerMap, Pinning, PodOwners};
use crate::store::{Health, NodeRecord, Store, StoreError};

mod health;
mod owners;
mod view;

pub use health::{HealthThresholds, judge_health};
pub use view::{NodeView, ProviderKind, ProviderView};

#[derive(Debug)]
struct NodeEntry {
    record: NodeRecord,
    last_report: Option<(Box<CapacityReport>, Instant)>,
    /// Silence is measured from the last report, or from enrollment / coordinator start.
    silent_since: Instant,
    links: u32,
    /// Links opened after the first one since this coordinator started (`None` before the first).
    reconnects: Option<u64>,
    applied: Option<AppliedStatus>,
    spec_tx: watch::Sender<NodeSpec>,
    /// Which certificates open a link; every open link watches it and closes when its own
    /// certificate no longer does. Dropped when the node is forgotten, which closes them too.
    auth_tx: watch::Sender<CertAuth>,
}

/// The certificates of a node that open a link right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAuth {
    current: String,
    /// The certificate a renewal replaced, until the node first connects with the new one.
    previous: Option<String>,
    revoked: bool,
}

impl CertAuth {
    fn of(record: &NodeRecord) -> CertAuth {
        CertAuth {
            current: record.cert_serial.clone(),
            previous: record.previous_cert_serial.clone(),
            revoked: record.revoked_at_unix.is_some(),
        }
    }

    /// Why the certificate with `serial` opens nothing, or `None` when it is valid.
    pub fn refuses(&self, node: &str, serial: &str) -> Option<Refusal> {
        if self.revoked {
            return Some(refusal(
                RefusalCode::CertificateRevoked,
                format!("the certificate of node {node} was revoked: re-enroll with `hexactl node reenroll {node}`"),
            ));
        }
        if self.current == serial || self.previous.as_deref() == Some(serial) {
            return None;
        }
        Some(refusal(
            RefusalCode::CertificateSuperseded,
            format!("this certificate of node {node} has been superseded (node re-enrolled or renewed); enroll again"),
        ))
    }
}

impl NodeEntry {
    fn new(record: NodeRecord, silent_since: Instant) -> NodeEntry {
        let (spec_tx, _) = watch::channel(record.spec.clone());
        let (auth_tx, _) = watch::channel(CertAuth::of(&record));
        NodeEntry {
            record,
            last_report: None,
            silent_since,
            links: 0,
            reconnects: None,
            applied: None,
            spec_tx,
            auth_tx,
        }
    }

    /// Makes `record` this node's record, telling links and the node what changed.
    fn set_record(&mut self, record: NodeRecord) {
        let auth = CertAuth::of(&record);
        self.auth_tx.send_if_modified(|current| {
            let changed = *current != auth;
            *current = auth;
            changed
        });
        self.record = record;
    }
}

/// What a link admitted by [`Inventory::admit_link`] runs with.
#[derive(Debug)]
pub struct Admission {
    pub pool: Pool,
    pub spec: watch::Receiver<NodeSpec>,
    pub auth: watch::Receiver<CertAuth>,
}

#[derive(Debug)]
pub struct Inventory {
    store: Store,
    enroller: Enroller,
    thresholds: HealthThresholds,
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    metrics: Arc<Metrics>,
    plans: Plans,
    /// The K3s cluster CA's hash, once the first server has reported it (persisted).
    cluster_ca_sha256: Mutex<Option<String>>,
    /// Who owns which pod IP, when isolation is on. Locked after `nodes`, never before.
    owners: Option<Mutex<OwnerBook>>,
    /// Set when what other nodes' desired state is derived from (pod ownership) may have changed;
    /// [`Inventory::refresh_desired`] catches up, off the report path.
    desired_stale: tokio::sync::Notify,
}

/// Pod ownership: what it is derived from, the map desired state is cut from, whether the
/// sources changed since that map was resolved, and the sets that changed since
/// [`Inventory::refresh_desired`] last recomputed the nodes holding them.
#[derive(Debug)]
struct OwnerBook {
    sources: PodOwners,
    map: OwnerMap,
    dirty: bool,
    pending: Changes,
}

/// State-database key of the cluster CA's hash, as the first server reported it.
const K3S_CA_SHA256: &str = "k3s_cluster_ca_sha256";
/// State-database key of the pod ranges nodes are pinned to (see [`crate::pod_owners`]).
const POD_RANGE_PINS: &str = "pod_range_pins";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation under these locks is a single assignment: the state is consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inventory {
    /// Loads every node from the store. Nodes start Pending (Lost ones stay Lost) until they report.
    pub fn load(
        store: Store,
        ca: Arc<CertificateAuthority>,
        thresholds: HealthThresholds,
        node_cert_validity: Duration,
        metrics: Arc<Metrics>,
        plans: Plans,
    ) -> Result<Inventory, StoreError> {
        let now = Instant::now();
        let mut nodes = BTreeMap::new();
        let mut reset = Vec::new();
        for (name, mut record) in store.nodes()? {
            if record.health != Health::Lost && record.health != Health::Pending {
                record.health = Health::Pending;
                record.health_since_unix = now_unix();
                reset.push(record.clone());
            }
            nodes.insert(name, NodeEntry::new(record, now + thresholds.start_grace));
        }
        // Few commits for the whole fleet: a commit per node would keep a large fleet waiting.
        store.put_nodes(&reset)?;
        let enroller = Enroller::new(store.clone(), ca, node_cert_validity);
        let cluster_ca_sha256 = Mutex::new(store.meta::<String>(K3S_CA_SHA256)?);
        let owners = match &plans.isolation {
            Some(plan) => {
                let pins = store.meta(POD_RANGE_PINS)?.unwrap_or_default();
                let sources = PodOwners::new(plan.pod_cidr, pins);
                Some(Mutex::new(OwnerBook {
                    sources,
                    map: OwnerMap::default(),
                    dirty: false,
                    pending: Changes::default(),
                }))
            }
            None => None,
        };
        let inventory = Inventory {
            store,
            enroller,
            thresholds,
            nodes: Mutex::new(nodes),
            metrics,
            plans,
            cluster_ca_sha256,
            owners,
            desired_stale: tokio::sync::Notify::new(),
        };
        // The K3s settings may have changed since the last run.
        inventory.respec_all(&mut inventory.nodes())?;
        Ok(inventory)
    }

    /// The desired state of every node in `names` (all when `None`), with `tenants` replacing the
    /// allocations of the one node they are given for, where it differs from what the node has.
    fn wanted_specs(
        &self,
        nodes: &BTreeMap<String, NodeEntry>,
        names: Option<&[&str]>,
        tenants: Option<(&str, Vec<TenantAllocation>)>,
    ) -> Vec<(String, NodeSpec)> {
        let mut book = self.owners.as_ref().map(lock);
        if let Some(book) = book.as_mut() {
            // Specs are cut from a map as fresh as the sources; the nodes this does not recompute
            // but whose sets changed are left to `refresh_desired`.
            if self.resolve_owners(nodes, book) {
                self.desired_stale.notify_one();
            }
        }
        let no_owners = OwnerMap::default();
        let ca = self.cluster_ca_sha256.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let addresses = desired::node_addresses(nodes.values().map(|e| &e.record));
        let fleet = Fleet {
            first_server: desired::first_server(nodes.values().map(|e| &e.record)),
            cluster_ca_sha256: ca.as_deref(),
            owners: book.as_ref().map_or(&no_owners, |b| &b.map),
            node_addresses: &addresses,
        };
        let mut tenants = tenants;
        // A set, not the slice: a recompute of most of a large fleet stays linear.
        let names: Option<std::collections::HashSet<&str>> = names.map(|names| names.iter().copied().collect());
        nodes
            .values()
            .filter(|e| names.as_ref().is_none_or(|names| names.contains(e.record.name.as_str())))
            .filter_map(|entry| {
                let current = &entry.record.spec;
                let allocations = match tenants.take_if(|(name, _)| *name == entry.record.name) {
                    Some((_, allocations)) => allocations,
                    None => current.tenants.clone(),
                };
                let wanted =
                    desired::node_spec(&entry.record, current.generation + 1, allocations, &fleet, &self.plans);
                (!current.same_content(&wanted)).then(|| (entry.record.name.clone(), wanted))
            })
            .collect()
    }

    /// Persists and pushes each changed desired state (a new generation only where content changed).
    fn set_specs(
        &self,
        nodes: &mut BTreeMap<String, NodeEntry>,
        specs: Vec<(String, NodeSpec)>,
    ) -> Result<(), StoreError> {
        let records: Vec<NodeRecord> = specs
            .into_iter()
            .filter_map(|(name, spec)| {
                let entry = nodes.get(&name)?;
                Some(NodeRecord { spec, ..entry.record.clone() })
            })
            .collect();
        // A fleet-wide change (a new node address in every node's isolation, new K3s settings)
        // costs a few flushes, not one per node.
        self.store.put_nodes(&records)?;
        for record in records {
            let Some(entry) = nodes.get_mut(&record.name) else { continue };
            let name = &record.name;
            tracing::info!(
                node = %name,
                generation = record.spec.generation,
                tenants = record.spec.tenants.len(),
                k3s = record.spec.k3s.is_some(),
                "desired state changed"
            );
            entry.spec_tx.send_replace(record.spec.clone());
            entry.record = record;
        }
        Ok(())
    }

    /// Recomputes `name`'s desired state from its record, `tenants` (or the ones it has) and the
    /// fleet.
    fn respec(
        &self,
        nodes: &mut BTreeMap<String, NodeEntry>,
        name: &str,
        tenants: Option<Vec<TenantAllocation>>,
    ) -> Result<(), StoreError> {
        let specs = self.wanted_specs(nodes, Some(&[name]), tenants.map(|t| (name, t)));
        self.set_specs(nodes, specs)
    }

    fn respec_all(&self, nodes: &mut BTreeMap<String, NodeEntry>) -> Result<(), StoreError> {
        let specs = self.wanted_specs(nodes, None, None);
        self.set_specs(nodes, specs)
    }

    /// Brings desired state up to date with pod ownership: resolves the map again when its
    /// sources changed since the last call, and recomputes the nodes whose sets it changed (those
    /// holding a tenant whose IPs changed; every tenant node when the system pods did). See
    /// [`Inventory::desired_stale`].
    pub fn refresh_desired(&self) -> Result<(), StoreError> {
        let mut nodes = self.nodes();
        let Some(owners) = &self.owners else { return Ok(()) };
        let changes = {
            let mut book = lock(owners);
            self.resolve_owners(&nodes, &mut book);
            std::mem::take(&mut book.pending)
        };
        let affected: Vec<&str> = nodes
            .values()
            .filter(|e| {
                (changes.system && e.record.pool != Pool::Server)
                    || e.record.spec.tenants.iter().any(|t| changes.tenants.contains(&t.tenant))
            })
            .map(|e| e.record.name.as_str())
            .collect();
        if affected.is_empty() {
            return Ok(());
        }
        let specs = self.wanted_specs(&nodes, Some(&affected), None);
        self.set_specs(&mut nodes, specs)
    }

    /// Resolves once reports have made desired state stale (at once if they did since the last
    /// call): the caller then waits a moment for more to arrive and calls
    /// [`Inventory::refresh_desired`] once for all of them.
    pub async fn desired_stale(&self) {
        self.desired_stale.notified().await;
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        // A panic while holding this lock would be a bug in this module; the map itself is still
        // consistent (every mutation is a single assignment), so keep serving.
        self.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a node (see [`crate::enroll`]) and starts serving it. When the node existed, every
    /// link still holding its old certificate is closed at once.
    pub fn enroll(&self, req: &EnrollRequest) -> Result<Enrolled, Refusal> {
        let admitted = self.enroller.enroll(req)?;
        let record = admitted.record;
        tracing::info!(
            node = %record.name,
            pool = %record.pool,
            token_id = %record.token_id,
            hostname = %req.hostname,
            reenrolled = admitted.replaced.is_some(),
            "node enrolled"
        );
        let mut nodes = self.nodes();
        match nodes.get_mut(&record.name) {
            Some(entry) => {
                entry.spec_tx.send_replace(record.spec.clone());
                entry.set_record(record);
                entry.silent_since = Instant::now();
            }
            None => {
                nodes.insert(record.name.clone(), NodeEntry::new(record, Instant::now()));
            }
        }
        let enrolled = admitted.enrolled;
        // A new server can change who joins where; anyone else only needs its own K3s spec.
        let result = if enrolled.pool == Pool::Server {
            self.respec_all(&mut nodes)
        } else {
            self.respec(&mut nodes, &enrolled.node_name, None)
        };
        result.map_err(Refusal::from)?;
        Ok(enrolled)
    }

    /// Checks that `serial` is a certificate that opens a link for `name`, and returns what the
    /// link runs with: the node's pool, its desired state, and the certificates still valid.
    pub fn admit_link(&self, name: &str, serial: &str, address: std::net::IpAddr) -> Result<Admission, Refusal> {
        let mut nodes = self.nodes();
        let entry = nodes.get_mut(name).ok_or_else(|| {
            refusal(RefusalCode::CertificateSuperseded, format!("node {name} is not enrolled here; enroll it again"))
        })?;
        if let Some(refused) = entry.auth_tx.borrow().refuses(name, serial) {
            return Err(refused);
        }
        let mut record = entry.record.clone();
        let retires_previous = record.cert_serial == serial && record.previous_cert_serial.is_some();
        if retires_previous {
            // The node uses its renewed certificate: the old one is retired for good (and a link
            // still open with it is closed).
            record.previous_cert_serial = None;
        }
        record.address = Some(address);
        let address_changed = entry.record.address != Some(address);
        if retires_previous {
            // A retired certificate must stay retired across a crash.
            self.store.put_node(&record)?;
            entry.set_record(record);
        } else if address_changed {
            // Only where the node links from changed: a crash that loses it loses nothing, since
            // the node's next link writes it again. Not waiting for the disk here keeps a fleet's
            // first links (one per node, all at once) from queueing behind one flush each while
            // the inventory is locked.
            self.store.write_unflushed(|tx| tx.put_node(&record))?;
            entry.set_record(record);
        }
        entry.links += 1;
        entry.reconnects = Some(entry.reconnects.map_or(0, |n| n + 1));
        let admitted = Admission {
            pool: entry.record.pool.clone(),
            spec: entry.spec_tx.subscribe(),
            auth: entry.auth_tx.subscribe(),
        };
        if address_changed && (entry.record.pool == Pool::Server || self.plans.isolation.is_some()) {
            // The first server's address is where the others join, and every node's address is
            // in every node's isolation.
            self.respec_all(&mut nodes)?;
        }
        Ok(admitted)
    }

    /// Moves `name`'s desired state past `applied`, the generation its agent says it applied, when
    /// that is ahead of ours (a restored state database, a node record made anew): the agent
    /// refuses specs older than what it has, so without this the node would never get one again.
    pub fn catch_up_generation(&self, name: &str, applied: u64) -> Result<(), StoreError> {
        let mut nodes = self.nodes();
        let Some(entry) = nodes.get_mut(name) else { return Ok(()) };
        if applied <= entry.record.spec.generation {
            return Ok(());
        }
        let mut record = entry.record.clone();
        record.spec.generation = applied + 1;
        self.store.put_node(&record)?;
        tracing::warn!(
            node = name,
            applied,
            generation = record.spec.generation,
            "node applied a generation ahead of the coordinator's; moved past it"
        );
        entry.spec_tx.send_replace(record.spec.clone());
        entry.set_record(record);
        Ok(())
    }

    /// Revokes `name`'s certificates: every link it has is closed and none opens again until the
    /// node is re-enrolled. The record stays (and with it the node's place in the inventory).
    pub fn revoke(&self, name: &str) -> Result<Option<NodeView>, StoreError> {
        let mut nodes = self.nodes();
        let Some(entry) = nodes.get_mut(name) else { return Ok(None) };
        if entry.record.revoked_at_unix.is_none() {
            let mut record = entry.record.clone();
            record.revoked_at_unix = Some(now_unix());
            self.store.put_node(&record)?;
            entry.set_record(record);
            tracing::warn!(node = name, "node certificate revoked; its links are closed");
            // A revoked node's reports count for nothing any more.
            self.owners_changed();
        }
        Ok(Some(Self::view_of(entry, Instant::now())))
    }

    /// Forgets `name`: its record is deleted and every link it has is closed. Returns the record
    /// it had, or `None` when there was no such node.
    pub fn forget(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let mut nodes = self.nodes();
        if !nodes.contains_key(name) {
            return Ok(None);
        }
        self.store.write(|tx| tx.remove_node(name))?;
        // Dropping the entry drops its senders: links watching them close.
        let entry = nodes.remove(name);
        tracing::warn!(node = name, "node deleted from the inventory");
        if let Some(owners) = &self.owners {
            let mut book = lock(owners);
            if book.sources.forget(name) {
                self.save_pins(&book.sources);
                book.dirty = true;
                self.desired_stale.notify_one();
            }
        }
        if entry.as_ref().is_some_and(|e| e.record.pool == Pool::Server) {
            self.respec_all(&mut nodes)?;
        }
        Ok(entry.map(|e| e.record))
    }

    /// The record of `name`, as persisted.
    pub fn record(&self, name: &str) -> Option<NodeRecord> {
        self.nodes().get(name).map(|e| e.record.clone())
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
        if pods_changed && let Some(owners) = &self.owners {
            let mut book = lock(owners);
            match book.sources.report(name, &report.pods) {
                Pinning::Unchanged => {}
                Pinning::Pinned(range) => {
                    tracing::info!(node = name, %range, "node pinned to the pod range of its first pods");
                    self.save_pins(&book.sources);
                }
                Pinning::Taken { block, holder } => tracing::warn!(
                    node = name,
                    range = %block,
                    holder = %holder,
                    "node reports pods in another node's pod range; it speaks for no pod until that node is deleted"
                ),
            }
            // With the API, reports decide nothing.
            book.dirty |= !book.sources.uses_api();
        }
        let reported_ca = match &report.k3s {
            hexa_shared::k3s::K3sState::Running { cluster_ca_sha256: Some(hash), .. } => Some(hash.clone()),
            _ => None,
        };
        let collected_at_unix_ms = report.collected_at_unix_ms;
        entry.last_report = Some((Box::new(report), now));
        entry.silent_since = now;
        self.metrics.report_recorded(collected_at_unix_ms, hexa_shared::clock::now_unix_ms());
        if entry.record.health != Health::Ready {
            self.transition(entry, Health::Ready);
        }
        if let Some(hash) = reported_ca {
            if desired::first_server(nodes.values().map(|e| &e.record)).is_some_and(|first| first.name == name) {
                self.learn_cluster_ca(&mut nodes, name, hash);
            }
        }
        // Tenants' IP sets are cluster-wide: a node's new pods can change other nodes' isolation
        // too. That is recomputed off the report path, once for a burst of changes.
        if pods_changed && self.owners.is_some() {
            self.desired_stale.notify_one();
        }
    }

    /// Takes the cluster CA's hash from the first server's report; the nodes waiting for it to
    /// join get their K3s specs. Only the server that initialised the cluster speaks for its CA.
    fn learn_cluster_ca(&self, nodes: &mut BTreeMap<String, NodeEntry>, server: &str, hash: String) {
        let mut known = self.cluster_ca_sha256.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.as_deref() == Some(hash.as_str()) {
            return;
        }
        if !hexa_shared::k3s::is_sha256_hex(&hash) {
            tracing::warn!(node = server, "ignoring a cluster CA hash that is not a sha256 in hex");
            return;
        }
        if let Err(e) = self.store.set_meta(K3S_CA_SHA256, &hash) {
            tracing::error!(node = server, error = %e, "cannot record the K3s cluster CA hash");
            return;
        }
        match known.replace(hash.clone()) {
            None => tracing::info!(node = server, ca_sha256 = %hash, "K3s cluster CA learned from the first server"),
            Some(old) => tracing::warn!(node = server, old = %old, new = %hash, "the K3s cluster CA changed"),
        }
        drop(known);
        if let Err(e) = self.respec_all(nodes) {
            tracing::error!(error = %e, "cannot update K3s specs after learning the cluster CA");
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

    /// Signs a renewal CSR for `name`, asked on a link that presented the certificate `serial`,
    /// and makes the new certificate the current one. A certificate that no longer opens a link
    /// cannot renew itself back.
    pub fn renew(&self, name: &str, serial: &str, csr_der: &[u8]) -> Result<Vec<Vec<u8>>, Refusal> {
        let mut nodes = self.nodes();
        let entry = nodes
            .get_mut(name)
            .ok_or_else(|| refusal(RefusalCode::CertificateSuperseded, format!("node {name} is no longer enrolled")))?;
        if let Some(refused) = entry.auth_tx.borrow().refuses(name, serial) {
            return Err(refused);
        }
        let issued = self.enroller.sign_renewal(name, csr_der)?;
        let mut record = entry.record.clone();
        record.previous_cert_serial = Some(serial.to_string());
        record.cert_serial = issued.serial.clone();
        record.cert_not_after_unix = issued.not_after_unix;
        self.store.put_node(&record)?;
        entry.set_record(record);
        tracing::info!(node = name, serial = %issued.serial, not_after_unix = issued.not_after_unix, "node certificate renewed");
        Ok(vec![issued.cert_der.to_vec()])
    }

    fn transition(&self, entry: &mut NodeEntry, to: Health) {
        let from = entry.record.health;
        let mut record = entry.record.clone();
        record.health = to;
        record.health_since_unix = now_unix();
        // Persist first: the in-memory state never claims a transition the disk does not have.
        // Pending, Ready and Unreachable all become Pending again at a restart ([`Inventory::load`]),
        // so a change among them need not wait for the disk (a fleet coming back would wait for one
        // flush per node); into or out of Lost, which a restart keeps, it must.
        let written = if from == Health::Lost || to == Health::Lost {
            self.store.put_node(&record)
        } else {
            self.store.write_unflushed(|tx| tx.put_node(&record))
        };
        match written {
            Ok(()) => {
                tracing::info!(node = %record.name, %from, %to, "node health changed");
                entry.record = record;
                // A Lost node's reports expire, and count again once it reports.
                if from == Health::Lost || to == Health::Lost {
                    self.owners_changed();
                }
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
            provider: ProviderView::from(&entry.record.provider),
            enrolled_at_unix: entry.record.enrolled_at_unix,
            cert_not_after_unix: entry.record.cert_not_after_unix,
            cordoned: entry.record.cordoned,
            revoked_at_unix: entry.record.revoked_at_unix,
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
            firewall_displacements: report.map(|(r, _)| r.firewall_displacements),
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
            entry.set_record(record);
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
    pub fn placement_nodes(&self) -> Vec<placement::NodeState> {
        self.nodes()
            .values()
            .map(|entry| {
                let report = entry.last_report.as_ref().map(|(r, _)| r);
                placement::NodeState {
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

    /// What `/metrics` says of each node (see [`crate::metrics`]).
    pub fn node_figures(&self) -> Vec<NodeFigures> {
        self.nodes()
            .values()
            .map(|entry| NodeFigures {
                node: entry.record.name.clone(),
                link_reconnects: entry.reconnects.unwrap_or(0),
                reported: entry.last_report.as_ref().map(|(report, _)| ReportedFigures {
                    isolation: report.isolation,
                    firewall_displacements: report.firewall_displacements,
                }),
            })
            .collect()
    }

    /// The counters this inventory feeds, for the parts of the coordinator that work with it.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn health_counts(&self) -> BTreeMap<Health, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.nodes().values() {
            *counts.entry(entry.record.health).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests;
