//! Dedicated nodes from Proxmox: one persisted state machine per VM.
//!
//! ```text
//! requested -> cloning -> configuring -> starting -> waiting for registration -> bound
//!                                                                                 |
//!                        gone <- destroying <- stopping <- draining <-------------+
//! ```
//!
//! Each VM has a record in the state database (table `vms`), written before every step acts, and
//! at most one step (one PVE task) in flight. The record names the VMID before the clone is asked
//! for and the VM is named `hx-<record>`, so a coordinator that restarts mid-clone finds the VM it
//! asked for instead of cloning another. Tenants' plans say how many VMs each wants; surplus VMs
//! (a smaller `count`, a move to shared, a deleted tenant) are drained, stopped, destroyed, and
//! their token, seed, node and record removed. A VM whose agent does not enroll within
//! `registration_timeout`, or whose step fails for good, is destroyed and replaced, and the
//! replacement carries the reason.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use hexa_shared::clock::{now_unix, now_unix_ms};
use hexa_shared::names::Pool;
use hexa_shared::pki::CaHash;
use hexa_shared::proto::ProviderIdentity;
use hexa_shared::tenant::{NodeClass, Phase, Plan};

use super::client::{CloneRequest, ProxmoxClient, ProxmoxError, Upid};
use super::settings::ProxmoxSettings;
use crate::bootstrap::{MintedToken, sha256_hex};
use crate::placement::ProvisionRequest;
use crate::store::{Store, StoreError, TokenRecord, TokenState};
use crate::tenants::{NodeProvisioner, Tenants};

/// Where a VM is in its life.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Requested,
    Cloning,
    Configuring,
    Starting,
    WaitingForRegistration,
    Bound,
    Draining,
    Stopping,
    Destroying,
}

impl VmState {
    /// Counts towards the tenant's VMs (not on its way out).
    fn active(self) -> bool {
        !matches!(self, VmState::Draining | VmState::Stopping | VmState::Destroying)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        f.write_str(&text)
    }
}

/// One VM, as the state database keeps it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// Random, 10 characters; the VM is `hx-<id>` in PVE and the node `hx-<id>`.
    pub id: String,
    pub tenant: String,
    pub node_class: String,
    pub state: VmState,
    pub created_unix_ms: u64,
    pub state_since_unix_ms: u64,
    /// No step before this (backoff after a failed one).
    #[serde(default)]
    pub not_before_unix_ms: u64,
    pub pve_node: Option<String>,
    pub vmid: Option<u32>,
    /// The in-flight clone task, when its answer came.
    #[serde(default)]
    pub upid: Option<String>,
    pub smbios_uuid: String,
    /// Path component of the seed URL; cleared once the node is bound.
    pub seed_id: Option<String>,
    pub token_id: Option<String>,
    /// The one-time token the seed hands out; cleared once the node is bound.
    pub token_secret: Option<String>,
    /// Why this VM is being removed (and the record goes when it is gone); set by the plan or a failure.
    #[serde(default)]
    pub retire: Option<String>,
    pub last_error: Option<String>,
    /// Failed VMs before this one for the same slot, for the replacement backoff.
    #[serde(default)]
    pub generation: u32,
}

impl VmRecord {
    pub fn vm_name(&self) -> String {
        format!("hx-{}", self.id)
    }

    pub fn node_name(&self) -> String {
        self.vm_name()
    }

    pub fn identity(&self) -> Option<ProviderIdentity> {
        self.vmid.map(|vmid| ProviderIdentity::Proxmox { vmid, smbios_uuid: self.smbios_uuid.clone() })
    }

    fn tags(&self, extra: &[String]) -> String {
        let mut tags =
            vec!["hexabase".to_string(), format!("hx-tenant-{}", self.tenant), format!("hx-rec-{}", self.id)];
        tags.extend(extra.iter().cloned());
        tags.join(";")
    }
}

/// A VM as `/v1/provisioning` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct VmView {
    pub record: String,
    pub tenant: String,
    pub node_class: String,
    pub state: VmState,
    /// Since the record was made.
    pub age_seconds: u64,
    /// In the current state.
    pub state_seconds: u64,
    pub proxmox_node: Option<String>,
    pub vmid: Option<u32>,
    pub node_name: String,
    pub last_error: Option<String>,
}

/// A VM that was destroyed because it failed, as `/v1/provisioning` keeps showing it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct Failure {
    pub at_unix: i64,
    pub tenant: String,
    pub record: String,
    pub vmid: Option<u32>,
    /// The state it failed in.
    pub state: VmState,
    pub reason: String,
}

/// State-database key of the recent failures, newest last.
const FAILURES: &str = "proxmox_failures";
/// How many failures are kept, and for how long.
const FAILURES_KEPT: usize = 50;
const FAILURES_FOR_SECS: i64 = 24 * 3600;

/// The Proxmox provisioner.
#[derive(Debug)]
pub struct Provisioner {
    settings: ProxmoxSettings,
    pub client: ProxmoxClient,
    store: Store,
    tenants: OnceLock<Arc<Tenants>>,
    classes: Vec<NodeClass>,
    ca_hash: CaHash,
    seed_base: OnceLock<String>,
    busy: Mutex<HashSet<String>>,
    /// Node, memory and VMID promised to VMs whose choice is not recorded yet, by record.
    promised: tokio::sync::Mutex<BTreeMap<String, (String, u64, u32)>>,
    wake: Notify,
}

fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// What a step decided.
enum Outcome {
    /// The record as it is now (written by the caller).
    Next(Box<VmRecord>),
    /// Nothing to do yet; look again later.
    Wait,
    /// The VM and everything of it is gone: remove the record.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Proxmox(#[from] ProxmoxError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Failed(String),
}

impl StepError {
    fn transient(&self) -> bool {
        match self {
            StepError::Proxmox(e) => e.is_transient(),
            StepError::Store(_) => true,
            StepError::Failed(_) => false,
        }
    }
}

impl NodeProvisioner for Provisioner {
    fn provision(&self, request: &ProvisionRequest) {
        tracing::info!(tenant = %request.tenant, class = %request.node_class, count = request.count, "dedicated VMs requested");
        self.wake.notify_one();
    }

    fn cancel(&self, request: &ProvisionRequest) {
        tracing::info!(tenant = %request.tenant, class = %request.node_class, count = request.count, "dedicated VM request withdrawn");
        self.wake.notify_one();
    }
}

impl Provisioner {
    pub fn new(
        settings: ProxmoxSettings,
        store: Store,
        classes: Vec<NodeClass>,
        ca_hash: CaHash,
    ) -> Result<Provisioner, ProxmoxError> {
        let client = ProxmoxClient::new(&settings)?;
        Ok(Provisioner {
            settings,
            client,
            store,
            tenants: OnceLock::new(),
            classes,
            ca_hash,
            seed_base: OnceLock::new(),
            busy: Mutex::new(HashSet::new()),
            promised: tokio::sync::Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        })
    }

    /// Completes the wiring: the tenants whose plans say what VMs are wanted, and where the seed
    /// server is reached.
    pub fn attach(&self, tenants: Arc<Tenants>, seed_base: String) {
        let _ = self.tenants.set(tenants);
        let _ = self.seed_base.set(seed_base);
    }

    pub fn settings(&self) -> &ProxmoxSettings {
        &self.settings
    }

    pub fn ca_hash(&self) -> CaHash {
        self.ca_hash
    }

    pub fn seed_base(&self) -> &str {
        self.seed_base.get().map(String::as_str).unwrap_or("")
    }

    pub fn records(&self) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self.store.vms()?.into_values().collect())
    }

    /// Every VM not yet bound (or on its way out), for `/v1/provisioning`.
    pub fn views(&self) -> Vec<VmView> {
        let now = now_unix_ms();
        let mut views: Vec<VmView> = self
            .records()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.state != VmState::Bound || r.retire.is_some())
            .map(|r| VmView {
                age_seconds: now.saturating_sub(r.created_unix_ms) / 1000,
                state_seconds: now.saturating_sub(r.state_since_unix_ms) / 1000,
                node_name: r.node_name(),
                record: r.id,
                tenant: r.tenant,
                node_class: r.node_class,
                state: r.state,
                proxmox_node: r.pve_node,
                vmid: r.vmid,
                last_error: r.last_error,
            })
            .collect();
        views.sort_by(|a, b| (&a.tenant, a.age_seconds, &a.record).cmp(&(&b.tenant, b.age_seconds, &b.record)));
        views
    }

    /// VMs destroyed for failing in the last day (at most 50), oldest first.
    pub fn failures(&self) -> Vec<Failure> {
        let now = now_unix();
        let kept: Vec<Failure> = self.store.meta(FAILURES).ok().flatten().unwrap_or_default();
        kept.into_iter().filter(|f| now - f.at_unix < FAILURES_FOR_SECS).collect()
    }

    fn class(&self, name: &str) -> Option<&NodeClass> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// Runs the provisioner until `shutdown` changes: a pass every `period` or when woken.
    pub async fn run(self: Arc<Self>, period: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut swept = false;
        loop {
            if !swept {
                match self.sweep_orphans().await {
                    Ok(n) => {
                        swept = true;
                        if n > 0 {
                            tracing::warn!(destroyed = n, "destroyed VMs tagged hexabase that no record knows");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot list Proxmox VMs yet"),
                }
            }
            if let Err(e) = self.pass().await {
                tracing::error!(error = %e, "provisioning pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
    }

    /// VMs we made (tag `hexabase`, or named `hx-<id>` from a clone that never got its tags)
    /// whose record is gone: a coordinator that died between destroying and forgetting.
    async fn sweep_orphans(&self) -> Result<usize, StepError> {
        // VMs first, then records: every VM listed had its record written before its clone was
        // asked for, so a VM being made while this runs is never taken for an orphan.
        let listed = self.client.vms().await?;
        let records = self.store.vms()?;
        let vmids: HashSet<u32> = records.values().filter_map(|r| r.vmid).collect();
        let mut destroyed = 0;
        for vm in listed {
            let tagged = vm.tag_list().contains(&"hexabase");
            let ours_by_name = vm.name.strip_prefix("hx-").is_some_and(|id| id.len() == 10);
            let Ok(vmid) = u32::try_from(vm.vmid) else { continue };
            if vm.template || !(tagged || ours_by_name) || vmids.contains(&vmid) {
                continue;
            }
            let record_id = vm
                .tag_list()
                .iter()
                .find_map(|t| t.strip_prefix("hx-rec-").map(String::from))
                .or_else(|| vm.name.strip_prefix("hx-").map(String::from));
            if record_id.is_some_and(|id| records.contains_key(&id)) {
                continue;
            }
            tracing::warn!(vmid, node = %vm.node, name = %vm.name, "VM of ours with no record: destroying it");
            if vm.status == "running" {
                self.client.power(&vm.node, vmid, "stop", &[]).await?;
            }
            self.client.destroy(&vm.node, vmid).await?;
            destroyed += 1;
        }
        Ok(destroyed)
    }

    /// One pass: records for what plans want, and a step for each record not already busy.
    pub async fn pass(self: &Arc<Self>) -> Result<(), StepError> {
        self.plan().await?;
        let now = now_unix_ms();
        for record in self.store.vms()?.into_values() {
            if record.not_before_unix_ms > now || (record.state == VmState::Bound && record.retire.is_none()) {
                continue;
            }
            {
                let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
                let limit = self.settings.max_in_flight;
                if (limit > 0 && busy.len() >= limit) || !busy.insert(record.id.clone()) {
                    continue;
                }
            }
            let this = self.clone();
            tokio::spawn(async move {
                let id = record.id.clone();
                this.step_and_record(record).await;
                this.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                this.wake.notify_one();
            });
        }
        Ok(())
    }

    /// Compares each tenant's plan with its VMs: new records for what is missing, `retire` on
    /// what is surplus.
    async fn plan(&self) -> Result<(), StepError> {
        let Some(tenants) = self.tenants.get() else { return Ok(()) };
        let tenants = tenants.list().await;
        let records = self.store.vms()?;
        let nodes = self.store.nodes()?;
        let mut by_tenant: BTreeMap<&str, Vec<&VmRecord>> = BTreeMap::new();
        for record in records.values() {
            by_tenant.entry(record.tenant.as_str()).or_default().push(record);
        }
        let mut create: Vec<VmRecord> = Vec::new();
        let mut retire: Vec<(String, String)> = Vec::new();
        let mut names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        names.extend(by_tenant.keys().copied());
        names.sort_unstable();
        names.dedup();
        for name in names {
            let tenant = tenants.iter().find(|t| t.name == name);
            let (wanted, class) = match tenant {
                Some(t) if t.phase != Phase::Deleting => match &t.plan {
                    Plan::Dedicated(plan) => (plan.count as usize, Some(plan.node_class.clone())),
                    Plan::Shared(_) => (0, None),
                },
                _ => (0, None),
            };
            let why = match tenant {
                None => "tenant deleted".to_string(),
                Some(t) if t.phase == Phase::Deleting => "tenant deleted".to_string(),
                Some(t) if matches!(t.plan, Plan::Shared(_)) => "tenant moved to the shared plan".to_string(),
                Some(_) => "dedicated plan shrank".to_string(),
            };
            let mine = by_tenant.get(name).cloned().unwrap_or_default();
            let bound_nodes: Vec<String> = tenant.map(|t| t.placement.dedicated_nodes.clone()).unwrap_or_default();
            let mut active: Vec<&VmRecord> = Vec::new();
            for record in mine {
                if record.retire.is_some() || !record.state.active() {
                    continue;
                }
                // A bound VM whose node is Lost is replaced: the tenant is Degraded meanwhile.
                let lost = record.state == VmState::Bound
                    && nodes.get(&record.node_name()).is_some_and(|n| n.health == crate::store::Health::Lost);
                if lost {
                    retire.push((record.id.clone(), format!("node {} lost", record.node_name())));
                    continue;
                }
                if Some(&record.node_class) != class.as_ref() {
                    retire.push((
                        record.id.clone(),
                        format!("{why} (node class {} no longer wanted)", record.node_class),
                    ));
                } else {
                    active.push(record);
                }
            }
            for id in surplus(&active, wanted, &bound_nodes) {
                retire.push((id, why.clone()));
            }
            if let Some(class) = class.filter(|_| active.len() < wanted) {
                for _ in active.len()..wanted {
                    create.push(self.new_record(name, &class, None, 0));
                }
            }
        }
        if create.is_empty() && retire.is_empty() {
            return Ok(());
        }
        self.store.write(|tx| {
            for record in &create {
                tx.put_vm(record)?;
            }
            for (id, why) in &retire {
                if let Some(mut record) = tx.vm(id)? {
                    record.retire = Some(why.clone());
                    record.not_before_unix_ms = 0;
                    tx.put_vm(&record)?;
                }
            }
            Ok::<_, StoreError>(())
        })?;
        for record in &create {
            tracing::info!(record = %record.id, tenant = %record.tenant, class = %record.node_class, "VM requested");
        }
        for (id, why) in &retire {
            tracing::info!(record = %id, reason = %why, "VM to be removed");
        }
        Ok(())
    }

    fn new_record(&self, tenant: &str, class: &str, last_error: Option<String>, generation: u32) -> VmRecord {
        let now = now_unix_ms();
        let backoff = if generation == 0 { 0 } else { (5_000u64 << generation.min(6)).min(300_000) };
        VmRecord {
            id: random_id(10),
            tenant: tenant.to_string(),
            node_class: class.to_string(),
            state: VmState::Requested,
            created_unix_ms: now,
            state_since_unix_ms: now,
            not_before_unix_ms: now + backoff,
            pve_node: None,
            vmid: None,
            upid: None,
            smbios_uuid: random_uuid(),
            seed_id: None,
            token_id: None,
            token_secret: None,
            retire: None,
            last_error,
            generation,
        }
    }

    /// Runs one step of `record` and writes what it decided; a failure is recorded, retried while
    /// transient, else the VM is destroyed and replaced.
    async fn step_and_record(&self, record: VmRecord) {
        let id = record.id.clone();
        let outcome = self.step(&record).await;
        let result = self.store.write(|tx| {
            // `retire` is the plan's to set; a step never clears it.
            let current = tx.vm(&id)?;
            let retire = current.as_ref().and_then(|c| c.retire.clone());
            match outcome {
                Ok(Outcome::Next(mut next)) => {
                    if next.retire.is_none() {
                        next.retire = retire;
                    }
                    if next.state != record.state {
                        next.state_since_unix_ms = now_unix_ms();
                    }
                    tx.put_vm(&next)?;
                }
                Ok(Outcome::Wait) => {}
                Ok(Outcome::Gone) => {
                    tx.remove_vm(&id)?;
                    if let Some(token) = &record.token_id {
                        tx.remove_token(token)?;
                    }
                }
                Err(e) => {
                    let Some(mut current) = current else { return Ok::<_, StoreError>(()) };
                    let message = e.to_string();
                    let elapsed = now_unix_ms().saturating_sub(current.state_since_unix_ms);
                    let retrying = e.transient() && elapsed < self.settings.retry_for.as_millis() as u64;
                    let on_the_way_out = !current.state.active() || current.retire.is_some();
                    tracing::warn!(record = %id, state = %current.state, error = %message, retrying, "VM step failed");
                    current.last_error = Some(message.clone());
                    if retrying || on_the_way_out {
                        let backoff = self.client.backoff.delay(3);
                        current.not_before_unix_ms = now_unix_ms() + backoff.as_millis() as u64;
                    } else {
                        // Destroy this one and replace it, carrying the reason.
                        let vm = current.vmid.map_or_else(|| format!("record {id}"), |v| format!("VM {v}"));
                        current.retire = Some(format!("failed: {message}"));
                        current.not_before_unix_ms = 0;
                        let replacement = self.new_record(
                            &current.tenant,
                            &current.node_class,
                            Some(format!("replaces {vm} ({}): {message}", current.state)),
                            current.generation + 1,
                        );
                        tx.put_vm(&replacement)?;
                        let mut kept: Vec<Failure> = tx.meta(FAILURES)?.unwrap_or_default();
                        kept.push(Failure {
                            at_unix: now_unix(),
                            tenant: current.tenant.clone(),
                            record: id.clone(),
                            vmid: current.vmid,
                            state: current.state,
                            reason: message.clone(),
                        });
                        let excess = kept.len().saturating_sub(FAILURES_KEPT);
                        kept.drain(..excess);
                        tx.set_meta(FAILURES, &kept)?;
                        tracing::info!(record = %replacement.id, replaces = %id, "replacement VM requested");
                    }
                    tx.put_vm(&current)?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(record = %id, error = %e, "cannot record a VM step");
        }
    }

    async fn step(&self, record: &VmRecord) -> Result<Outcome, StepError> {
        let mut next = record.clone();
        if let Some(reason) = &record.retire {
            return self.retire_step(next, reason).await;
        }
        match record.state {
            VmState::Requested => {
                let (node, vmid) = self.choose_node(&next).await?;
                next.vmid = Some(vmid);
                next.pve_node = Some(node);
                next.state = VmState::Cloning;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Cloning => self.clone_step(next).await,
            VmState::Configuring => self.configure_step(next).await,
            VmState::Starting => {
                let (node, vmid) = placed(&next)?;
                // Started already when a previous attempt's answer was lost.
                if self.client.status(&node, vmid).await?.status != "running" {
                    self.client.power(&node, vmid, "start", &[]).await?;
                }
                next.state = VmState::WaitingForRegistration;
                next.last_error = next.last_error.filter(|e| e.starts_with("replaces"));
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::WaitingForRegistration => {
                if let Some(node) = self.registered_node(&next)? {
                    tracing::info!(record = %next.id, node, vmid = ?next.vmid, "VM registered; seed and token revoked");
                    next.state = VmState::Bound;
                    next.seed_id = None;
                    next.token_secret = None;
                    next.last_error = None;
                    return Ok(Outcome::Next(Box::new(next)));
                }
                let waited = now_unix_ms().saturating_sub(next.state_since_unix_ms);
                if waited > self.settings.registration_timeout.as_millis() as u64 {
                    return Err(StepError::Failed(format!(
                        "did not register within {}",
                        humantime::format_duration(self.settings.registration_timeout)
                    )));
                }
                Ok(Outcome::Wait)
            }
            VmState::Bound => Ok(Outcome::Wait),
            VmState::Draining | VmState::Stopping | VmState::Destroying => {
                let reason = next.retire.clone().unwrap_or_else(|| "removed".into());
                self.retire_step(next, &reason).await
            }
        }
    }

    /// The allowed online node with most free memory, counting as used the memory of VMs already
    /// headed there that PVE does not count yet (not running); and a VMID from `/cluster/nextid`
    /// that none of our VMs on their way holds (PVE sees those only once their clone starts).
    async fn choose_node(&self, record: &VmRecord) -> Result<(String, u32), StepError> {
        let nodes = self.client.nodes().await?;
        let mut promised = self.promised.lock().await;
        let records = self.store.vms()?;
        // Promises whose record has its node recorded (or is gone) are in the records now.
        promised.retain(|id, _| records.get(id).is_some_and(|r| r.pve_node.is_none()));
        let memory_of = |class: &str| self.class(class).map_or(0, |c| c.memory_bytes);
        let mut headed: BTreeMap<&str, u64> = BTreeMap::new();
        for r in records.values() {
            if let (Some(node), VmState::Cloning | VmState::Configuring | VmState::Starting) = (&r.pve_node, r.state) {
                *headed.entry(node.as_str()).or_default() += memory_of(&r.node_class);
            }
        }
        for (node, bytes, _) in promised.values() {
            *headed.entry(node.as_str()).or_default() += bytes;
        }
        let chosen = nodes
            .into_iter()
            .filter(|n| n.status == "online")
            .filter(|n| self.settings.target_nodes.is_empty() || self.settings.target_nodes.contains(&n.node))
            .max_by_key(|n| {
                let used = n.mem + headed.get(n.node.as_str()).copied().unwrap_or(0);
                n.maxmem.saturating_sub(used)
            })
            .map(|n| n.node)
            .ok_or_else(|| {
                StepError::Failed(format!(
                    "no online Proxmox node among {}",
                    if self.settings.target_nodes.is_empty() {
                        "the cluster's".to_string()
                    } else {
                        self.settings.target_nodes.join(", ")
                    }
                ))
            })?;
        let held: HashSet<u32> =
            records.values().filter_map(|r| r.vmid).chain(promised.values().map(|(_, _, vmid)| *vmid)).collect();
        let mut vmid = self.client.next_id().await?;
        while held.contains(&vmid) {
            vmid += 1;
        }
        promised.insert(record.id.clone(), (chosen.clone(), memory_of(&record.node_class), vmid));
        Ok((chosen, vmid))
    }

    async fn clone_step(&self, mut next: VmRecord) -> Result<Outcome, StepError> {
        let (target, vmid) = placed(&next)?;
        let template = self
            .settings
            .templates
            .get(&next.node_class)
            .ok_or_else(|| StepError::Failed(format!("no template for node class {}", next.node_class)))?;
        let existing = self.client.vms().await?.into_iter().find(|v| v.vmid == u64::from(vmid));
        match existing {
            Some(vm) if vm.name == next.vm_name() => {
                // Ours: asked for before (the answer, or this coordinator, was lost). Let it finish.
                if vm.lock == "clone" {
                    if let Some(upid) = next.upid.clone() {
                        self.client.follow(&Upid::parse(&upid)?).await?;
                    } else {
                        return Ok(Outcome::Wait);
                    }
                }
                next.pve_node = Some(vm.node);
                next.upid = None;
                next.state = VmState::Configuring;
                return Ok(Outcome::Next(Box::new(next)));
            }
            Some(vm) => {
                tracing::info!(record = %next.id, vmid, holder = %vm.name, "VMID taken since nextid; choosing another");
                next.vmid = Some(self.client.next_id().await?);
                next.upid = None;
                next.last_error = Some(format!("VMID {vmid} was taken by {:?} before the clone; retried", vm.name));
                return Ok(Outcome::Next(Box::new(next)));
            }
            None if next.upid.is_some() => {
                // The task we followed ended without a VM: it failed; ask again.
                next.upid = None;
                return Ok(Outcome::Next(Box::new(next)));
            }
            None => {}
        }
        let name = next.vm_name();
        let request = CloneRequest {
            template_node: &template.node,
            template_vmid: template.vmid,
            newid: vmid,
            name: &name,
            target: &target,
            full: self.settings.full_clone,
            storage: &self.settings.storage,
        };
        match self.client.clone_vm(&request).await {
            Ok(upid) => {
                // Persist the task before following it, so a restart follows the same one.
                next.upid = Some(upid.text.clone());
                self.store.write(|tx| {
                    if let Some(mut current) = tx.vm(&next.id)? {
                        current.upid = next.upid.clone();
                        tx.put_vm(&current)?;
                    }
                    Ok::<_, StoreError>(())
                })?;
                match self.client.follow(&upid).await {
                    Ok(()) => {
                        next.upid = None;
                        next.state = VmState::Configuring;
                        Ok(Outcome::Next(Box::new(next)))
                    }
                    Err(e) if e.is_vmid_taken() => self.new_vmid(next, vmid, &e).await,
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) if e.is_vmid_taken() => self.new_vmid(next, vmid, &e).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn new_vmid(&self, mut next: VmRecord, vmid: u32, e: &ProxmoxError) -> Result<Outcome, StepError> {
        tracing::info!(record = %next.id, vmid, error = %e, "VMID collision; choosing another");
        next.vmid = Some(self.client.next_id().await?);
        next.upid = None;
        next.last_error = Some(format!("VMID {vmid} collided ({}); retried with another", e.text()));
        Ok(Outcome::Next(Box::new(next)))
    }

    async fn configure_step(&self, mut next: VmRecord) -> Result<Outcome, StepError> {
        let (node, vmid) = placed(&next)?;
        let class = self
            .class(&next.node_class)
            .cloned()
            .ok_or_else(|| StepError::Failed(format!("unknown node class {}", next.node_class)))?;
        if next.token_id.is_none() || next.seed_id.is_none() {
            // Token and seed exist before the VM can ask for them; both are bound to this VM.
            let minted = MintedToken::generate();
            let identity = next.identity().ok_or_else(|| StepError::Failed("no VMID".into()))?;
            let now = now_unix();
            let ttl = self.settings.registration_timeout + self.settings.task_timeout;
            let token = TokenRecord {
                id: minted.id.clone(),
                secret_sha256: sha256_hex(&minted.secret),
                pool: Pool::Dedicated { tenant: next.tenant.clone() },
                description: format!("Proxmox VM {vmid} ({}) for tenant {}", next.vm_name(), next.tenant),
                node_class: Some(next.node_class.clone()),
                created_at_unix: now,
                expires_at_unix: now + ttl.as_secs() as i64,
                state: TokenState::Active,
                reenroll: None,
                provider: Some(identity),
            };
            next.token_id = Some(minted.id.clone());
            next.token_secret = Some(minted.text());
            next.seed_id = Some(crate::bootstrap::random_secret());
            self.store.write(|tx| {
                tx.put_token(&token)?;
                tx.put_vm(&next)?;
                Ok::<_, StoreError>(())
            })?;
        }
        let seed = format!("{}/seed/{}/", self.seed_base(), next.seed_id.as_deref().unwrap_or_default());
        let mut params = vec![
            ("cores", class.cpu_millis.div_ceil(1000).max(1).to_string()),
            ("memory", (class.memory_bytes >> 20).max(16).to_string()),
            ("tags", next.tags(&self.settings.tags)),
            ("smbios1", super::userdata::smbios1(&next.smbios_uuid, &seed)),
            ("onboot", "1".to_string()),
        ];
        if !self.settings.bridge.is_empty() {
            params.push(("net0", format!("virtio,bridge={}", self.settings.bridge)));
        }
        self.client.configure(&node, vmid, &params).await?;
        let disk =
            self.settings.templates.get(&next.node_class).map(|t| t.disk.clone()).unwrap_or_else(|| "scsi0".into());
        let gib = class.disk_bytes >> 30;
        if gib > 0 {
            self.client.resize(&node, vmid, &disk, &format!("{gib}G")).await?;
        }
        next.state = VmState::Starting;
        Ok(Outcome::Next(Box::new(next)))
    }

    /// The node this VM's agent enrolled as: with this VM's token and identity.
    fn registered_node(&self, record: &VmRecord) -> Result<Option<String>, StoreError> {
        let (Some(token), Some(identity)) = (&record.token_id, record.identity()) else { return Ok(None) };
        Ok(self.store.nodes()?.into_values().find(|n| &n.token_id == token && n.provider == identity).map(|n| n.name))
    }

    /// Drain, stop, destroy, forget: each call does the next of these.
    async fn retire_step(&self, mut next: VmRecord, reason: &str) -> Result<Outcome, StepError> {
        match next.state {
            VmState::Bound | VmState::Draining => {
                let node = self.registered_node(&next)?;
                if let (Some(node), Some(tenants)) = (node, self.tenants.get()) {
                    match tenants.drain(&node).await {
                        Ok(_) | Err(crate::tenants::TenantsError::NoNode(_)) => {}
                        Err(e) => return Err(StepError::Failed(format!("cannot drain node {node}: {e}"))),
                    }
                }
                next.state = VmState::Stopping;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Cloning if next.upid.is_some() => {
                // Let the clone finish, so that the VM can be destroyed (it is locked until then).
                if let Some(upid) = &next.upid {
                    let _ = self.client.follow(&Upid::parse(upid)?).await;
                }
                next.upid = None;
                next.state = VmState::Stopping;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Requested => {
                self.forget(&next).await?;
                Ok(Outcome::Gone)
            }
            VmState::Cloning
            | VmState::Configuring
            | VmState::Starting
            | VmState::WaitingForRegistration
            | VmState::Stopping => {
                if let Some((node, vmid)) = self.vm_of(&next).await? {
                    let status = self.client.status(&node, vmid).await?;
                    if status.lock == "clone" {
                        return Ok(Outcome::Wait);
                    }
                    if status.status == "running" {
                        let timeout = self.settings.shutdown_timeout.as_secs().max(1);
                        let clean =
                            self.client.power(&node, vmid, "shutdown", &[("timeout", timeout.to_string())]).await;
                        if let Err(e) = clean {
                            tracing::info!(record = %next.id, vmid, error = %e, "clean shutdown failed; stopping");
                            self.client.power(&node, vmid, "stop", &[]).await?;
                        }
                    }
                }
                next.state = VmState::Destroying;
                tracing::info!(record = %next.id, reason, "VM stopped");
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Destroying => {
                if let Some((node, vmid)) = self.vm_of(&next).await? {
                    let status = self.client.status(&node, vmid).await?;
                    if status.status == "running" {
                        self.client.power(&node, vmid, "stop", &[]).await?;
                    }
                    match self.client.destroy(&node, vmid).await {
                        Ok(()) => {}
                        Err(e) if e.is_missing() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.forget(&next).await?;
                tracing::info!(record = %next.id, tenant = %next.tenant, vmid = ?next.vmid, reason, "VM destroyed; its token, seed, node and record removed");
                Ok(Outcome::Gone)
            }
        }
    }

    /// Where the VM of `record` is, if it exists and is ours.
    async fn vm_of(&self, record: &VmRecord) -> Result<Option<(String, u32)>, StepError> {
        let Some(vmid) = record.vmid else { return Ok(None) };
        let found = self.client.vms().await?.into_iter().find(|v| v.vmid == u64::from(vmid));
        Ok(found.filter(|v| v.name == record.vm_name()).map(|v| (v.node, vmid)))
    }

    /// Removes the node this VM became (certificate revoked, shares moved, record gone).
    async fn forget(&self, record: &VmRecord) -> Result<(), StepError> {
        if let (Some(node), Some(tenants)) = (self.registered_node(record)?, self.tenants.get()) {
            match tenants.delete_node(&node).await {
                Ok(_) | Err(crate::tenants::TenantsError::NoNode(_)) => {}
                Err(e) => return Err(StepError::Failed(format!("cannot delete node {node}: {e}"))),
            }
        }
        Ok(())
    }

    /// The seed of `seed_id` while it may be served: its VM is on its way up and its token unused.
    pub fn seed(&self, seed_id: &str) -> Option<(VmRecord, String)> {
        let records = self.store.vms().ok()?;
        let record = records.into_values().find(|r| {
            r.seed_id.as_deref().is_some_and(|s| crate::bootstrap::hashes_equal(s, seed_id))
                && r.retire.is_none()
                && matches!(r.state, VmState::Configuring | VmState::Starting | VmState::WaitingForRegistration)
        })?;
        let token = self.store.tokens().ok()?.remove(record.token_id.as_deref()?)?;
        if token.state != TokenState::Active || token.expires_at_unix <= now_unix() {
            return None;
        }
        let secret = record.token_secret.clone()?;
        Some((record, secret))
    }
}

/// Which of a tenant's `active` VMs go when it wants only `wanted`: VMs not yet bound first
/// (newest first), then bound ones whose node placement no longer holds for the tenant, then the
/// rest (newest first).
fn surplus(active: &[&VmRecord], wanted: usize, bound_nodes: &[String]) -> Vec<String> {
    if active.len() <= wanted {
        return Vec::new();
    }
    let mut order: Vec<&VmRecord> = active.to_vec();
    order.sort_by_key(|r| {
        let bound = r.state == VmState::Bound;
        let held = bound_nodes.contains(&r.node_name());
        (held, bound, std::cmp::Reverse(r.created_unix_ms), r.id.clone())
    });
    order[..active.len() - wanted].iter().map(|r| r.id.clone()).collect()
}

fn placed(record: &VmRecord) -> Result<(String, u32), StepError> {
    match (&record.pve_node, record.vmid) {
        (Some(node), Some(vmid)) => Ok((node.clone(), vmid)),
        _ => Err(StepError::Failed(format!("record {} has no Proxmox node or VMID", record.id))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: VmState, created: u64) -> VmRecord {
        VmRecord {
            id: id.into(),
            tenant: "acme".into(),
            node_class: "S".into(),
            state,
            created_unix_ms: created,
            state_since_unix_ms: created,
            not_before_unix_ms: 0,
            pve_node: Some("pve1".into()),
            vmid: Some(100),
            upid: None,
            smbios_uuid: random_uuid(),
            seed_id: None,
            token_id: None,
            token_secret: None,
            retire: None,
            last_error: None,
            generation: 0,
        }
    }

    #[test]
    fn surplus_takes_unbound_vms_then_nodes_placement_let_go() {
        let a = record("aaaaaaaaaa", VmState::Bound, 1);
        let b = record("bbbbbbbbbb", VmState::Bound, 2);
        let c = record("cccccccccc", VmState::Cloning, 3);
        let d = record("dddddddddd", VmState::WaitingForRegistration, 4);
        let all = [&a, &b, &c, &d];
        let held = vec![a.node_name(), b.node_name()];
        // (wanted, nodes placement holds) -> records to retire
        let cases: [(usize, Vec<String>, Vec<&str>); 5] = [
            (4, held.clone(), vec![]),
            (3, held.clone(), vec!["dddddddddd"]),
            (2, held.clone(), vec!["dddddddddd", "cccccccccc"]),
            // Placement let go of a's node: a goes before b.
            (1, vec![b.node_name()], vec!["dddddddddd", "cccccccccc", "aaaaaaaaaa"]),
            (0, held.clone(), vec!["dddddddddd", "cccccccccc", "bbbbbbbbbb", "aaaaaaaaaa"]),
        ];
        for (wanted, held, expected) in cases {
            assert_eq!(surplus(&all, wanted, &held), expected, "wanted {wanted}, held {held:?}");
        }
    }

    #[test]
    fn records_tag_and_name_their_vm() {
        let r = record("k3v9q2m1xz", VmState::Requested, 0);
        assert_eq!(r.vm_name(), "hx-k3v9q2m1xz");
        assert_eq!(r.tags(&["rack-3".into()]), "hexabase;hx-tenant-acme;hx-rec-k3v9q2m1xz;rack-3");
        assert_eq!(r.identity(), Some(ProviderIdentity::Proxmox { vmid: 100, smbios_uuid: r.smbios_uuid.clone() }));
        let uuid = random_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4", "a version 4 uuid: {uuid}");
        assert_eq!(VmState::WaitingForRegistration.to_string(), "waiting_for_registration");
    }
}
