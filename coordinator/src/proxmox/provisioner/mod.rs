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
//!
//! - this module: the [`Provisioner`], its loop, and planning how many VMs each tenant wants;
//! - `record`: a VM's persisted record and how `/v1/provisioning` shows it;
//! - `steps`: one step of a VM's state machine (clone, configure, start, wait, retire).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, watch};

use hexa_shared::clock::{now_unix, now_unix_ms};
use hexa_shared::names::Pool;
use hexa_shared::pki::CaHash;
use hexa_shared::tenant::{NodeClass, Phase, Plan};

use super::client::{CloneRequest, ProxmoxClient, ProxmoxError, Upid};
use super::settings::ProxmoxSettings;
use crate::bootstrap::{MintedToken, sha256_hex};
use crate::placement::ProvisionRequest;
use crate::store::{Store, StoreError, TokenRecord, TokenState};
use crate::tenants::{NodeProvisioner, Tenants};

mod record;
mod steps;

pub use record::{Failure, VmRecord, VmState, VmView};

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

#[cfg(test)]
mod tests;
