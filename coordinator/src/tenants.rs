//! Tenant lifecycle: create, change plan, delete, and the reactions to nodes that are cordoned,
//! drained or lost. Every change is a placement [`Decision`]; it is written to the state database
//! before anything acts on it (placement state, node specs, provisioning), so a coordinator that
//! dies at any point restarts to the same tenants and placements, never a half or a double.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::Mutex;

use hexa_shared::tenant::{ConditionType, Phase, Plan, ShareSize, Tenant, reasons};

use crate::desired::AllocationPlan;
use crate::inventory::{Inventory, NodeView};
use crate::placement::{self, Decision, PlacementConfig, PlacementError, PlacementState, ProvisionRequest, Request};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no tenant named {0:?}")]
    NotFound(String),
    #[error("no node named {0:?}")]
    NoNode(String),
    #[error("tenant {0} is still being deleted from the host cluster: wait until it is gone, or choose another name")]
    StillDeleting(String),
}

/// Where requests for dedicated nodes go. The Proxmox provisioner implements it; without one,
/// requests stay recorded (`/v1/provisioning`) and their tenants stay Provisioning.
pub trait NodeProvisioner: Send + Sync + std::fmt::Debug {
    fn provision(&self, request: &ProvisionRequest);
    fn cancel(&self, request: &ProvisionRequest);
}

/// The provisioner used when none is configured: it records nothing beyond the state database.
#[derive(Debug, Default)]
pub struct RecordOnly;

impl NodeProvisioner for RecordOnly {
    fn provision(&self, request: &ProvisionRequest) {
        tracing::info!(tenant = %request.tenant, class = %request.node_class, count = request.count,
            "dedicated nodes needed; no provisioner is configured, the request stays recorded");
    }

    fn cancel(&self, request: &ProvisionRequest) {
        tracing::info!(tenant = %request.tenant, class = %request.node_class, count = request.count, "dedicated node request withdrawn");
    }
}

#[derive(Debug)]
struct Book {
    placement: PlacementState,
    tenants: BTreeMap<String, Tenant>,
    /// Each node as placement last saw it, so unchanged nodes are not re-indexed every reconcile.
    nodes: BTreeMap<String, placement::NodeState>,
    /// Tenants created or given a new plan and not yet placed whole, with when that was asked
    /// (in memory only: `hexa_placement_seconds` covers requests made since this start).
    requested: BTreeMap<String, std::time::Instant>,
}

#[derive(Debug)]
pub struct Tenants {
    store: Store,
    inventory: Arc<Inventory>,
    /// How each share placed on a node becomes the tenant's allocation there.
    allocations: AllocationPlan,
    provisioner: Arc<dyn NodeProvisioner>,
    book: Mutex<Book>,
    /// Deleted tenants stay listed as Deleting until their objects on the host cluster are gone
    /// ([`Tenants::forget`]); without a host cluster to clean up they go at once.
    keep_tombstones: bool,
}

fn now_ms() -> u64 {
    hexa_shared::clock::now_unix_ms()
}

fn state_of(tenant: &Tenant) -> placement::TenantState {
    placement::TenantState { name: tenant.name.clone(), plan: tenant.plan.clone(), placement: tenant.placement.clone() }
}

/// Phase and Placed condition that follow from a tenant's placement and what could not be placed.
fn derive_phase(tenant: &mut Tenant, unplaced: &[&placement::Unplaced], now: u64) {
    let (phase, status, reason, message) = if let Some(u) = unplaced.first() {
        let message = format!("share {} is stuck on node {}: {}", u.share, u.node, u.reason);
        (Phase::Degraded, false, reasons::NODE_LOST, message)
    } else {
        match &tenant.plan {
            Plan::Dedicated(plan) if tenant.placement.awaiting_nodes > 0 => (
                Phase::Provisioning,
                false,
                reasons::AWAITING_NODES,
                format!(
                    "waiting for {} dedicated node(s) of class {}; {} of {} bound",
                    tenant.placement.awaiting_nodes,
                    plan.node_class,
                    tenant.placement.dedicated_nodes.len(),
                    plan.count
                ),
            ),
            Plan::Dedicated(_) => (
                Phase::Deploying,
                true,
                reasons::PLACED,
                format!("on nodes {}", tenant.placement.dedicated_nodes.join(", ")),
            ),
            Plan::Shared(_) => {
                let nodes: Vec<&str> = tenant.placement.shares.iter().map(|s| s.node.as_str()).collect();
                (Phase::Deploying, true, reasons::PLACED, format!("shares on nodes {}", nodes.join(", ")))
            }
        }
    };
    tenant.phase = phase;
    tenant.set_condition(ConditionType::Placed, status, reason, &message, now);
}

impl Tenants {
    /// Loads every tenant and places the fleet as the state database last recorded it, then brings
    /// every node's desired state in line with that.
    pub fn load(
        store: Store,
        inventory: Arc<Inventory>,
        config: PlacementConfig,
        allocations: AllocationPlan,
        provisioner: Arc<dyn NodeProvisioner>,
        keep_tombstones: bool,
    ) -> Result<Tenants, TenantsError> {
        config.validate()?;
        let tenants = store.tenants()?;
        let nodes: BTreeMap<String, placement::NodeState> =
            inventory.placement_nodes().into_iter().map(|n| (n.name.clone(), n)).collect();
        // Deleting tenants hold no capacity any more.
        let states = tenants.values().filter(|t| t.phase != Phase::Deleting).map(state_of).collect();
        let placement = PlacementState::new(config, nodes.values().cloned().collect(), states)?;
        let book = Mutex::new(Book { placement, tenants, nodes, requested: BTreeMap::new() });
        let service = Tenants { store, inventory, allocations, provisioner, book, keep_tombstones };
        let book = service.book.try_lock().map_err(|_| StoreError::Db("tenant book busy at load".into()))?;
        let every_node: BTreeSet<String> = book.nodes.keys().cloned().collect();
        service.push_specs(&book, &every_node)?;
        drop(book);
        Ok(service)
    }

    pub async fn list(&self) -> Vec<Tenant> {
        self.book.lock().await.tenants.values().cloned().collect()
    }

    pub async fn get(&self, name: &str) -> Result<Tenant, TenantsError> {
        self.book.lock().await.tenants.get(name).cloned().ok_or_else(|| TenantsError::NotFound(name.to_string()))
    }

    /// Dedicated nodes still awaited: what each dedicated tenant's placement is waiting for.
    pub async fn provisioning(&self) -> Vec<ProvisionRequest> {
        self.book
            .lock()
            .await
            .tenants
            .values()
            .filter_map(|t| match &t.plan {
                Plan::Dedicated(plan) if t.placement.awaiting_nodes > 0 => Some(ProvisionRequest {
                    tenant: t.name.clone(),
                    node_class: plan.node_class.clone(),
                    count: t.placement.awaiting_nodes,
                }),
                _ => None,
            })
            .collect()
    }

    /// Creates and places a tenant. It is acknowledged only once it is durably recorded.
    pub async fn create(&self, name: &str, plan: Plan) -> Result<Tenant, TenantsError> {
        let mut book = self.book.lock().await;
        if book.tenants.get(name).is_some_and(|t| t.phase == Phase::Deleting) {
            return Err(TenantsError::StillDeleting(name.to_string()));
        }
        let asked = std::time::Instant::now();
        self.refresh_nodes(&mut book)?;
        let decision = book.placement.decide(&Request::Place { tenant: name.to_string(), plan })?;
        self.commit(&mut book, &decision)?;
        book.requested.insert(name.to_string(), asked);
        self.note_placed(&mut book, name);
        tracing::info!(tenant = name, "tenant created");
        book.tenants.get(name).cloned().ok_or_else(|| TenantsError::NotFound(name.to_string()))
    }

    /// Resizes a tenant or moves it between the shared and dedicated plans.
    pub async fn change_plan(&self, name: &str, plan: Plan) -> Result<Tenant, TenantsError> {
        let mut book = self.book.lock().await;
        if book.tenants.get(name).is_some_and(|t| t.phase == Phase::Deleting) {
            return Err(TenantsError::StillDeleting(name.to_string()));
        }
        let asked = std::time::Instant::now();
        self.refresh_nodes(&mut book)?;
        let decision = book.placement.decide(&Request::ChangePlan { tenant: name.to_string(), plan })?;
        self.commit(&mut book, &decision)?;
        book.requested.insert(name.to_string(), asked);
        self.note_placed(&mut book, name);
        tracing::info!(tenant = name, "tenant plan changed");
        book.tenants.get(name).cloned().ok_or_else(|| TenantsError::NotFound(name.to_string()))
    }

    /// Deletes a tenant and frees the capacity it held at once. With a host cluster to clean up,
    /// the tenant stays listed as Deleting until [`forget`](Self::forget) says nothing is left.
    pub async fn delete(&self, name: &str) -> Result<Tenant, TenantsError> {
        let mut book = self.book.lock().await;
        let mut last = book.tenants.get(name).cloned().ok_or_else(|| TenantsError::NotFound(name.to_string()))?;
        if last.phase == Phase::Deleting {
            return Ok(last);
        }
        let decision = book.placement.decide(&Request::Delete { tenant: name.to_string() })?;
        self.commit(&mut book, &decision)?;
        last.phase = Phase::Deleting;
        last.placement = Default::default();
        last.set_condition(
            ConditionType::Deployed,
            false,
            reasons::DELETING,
            "removing its objects from the host cluster",
            now_ms(),
        );
        if self.keep_tombstones {
            self.store.write(|tx| tx.put_tenant(&last))?;
            book.tenants.insert(name.to_string(), last.clone());
        }
        tracing::info!(tenant = name, "tenant deleted");
        Ok(last)
    }

    /// Drops a Deleting tenant for good, once nothing of it is left on the host cluster.
    pub async fn forget(&self, name: &str) -> Result<(), TenantsError> {
        let mut book = self.book.lock().await;
        if book.tenants.get(name).is_some_and(|t| t.phase == Phase::Deleting) {
            self.store.write(|tx| tx.remove_tenant(name))?;
            book.tenants.remove(name);
            tracing::info!(tenant = name, "tenant removed from the host cluster; nothing of it is left");
        }
        Ok(())
    }

    /// Records what the host cluster says of a tenant: its objects applied (or why not), and
    /// whether its vCluster is up. Phase follows: Ready when deployed and up.
    pub async fn set_realization(
        &self,
        name: &str,
        deployed: Result<&str, (&str, &str)>,
        ready: bool,
    ) -> Result<(), TenantsError> {
        let mut book = self.book.lock().await;
        let Some(current) = book.tenants.get(name) else { return Ok(()) };
        if current.phase == Phase::Deleting {
            return Ok(());
        }
        let mut tenant = current.clone();
        let now = now_ms();
        match deployed {
            Ok(message) => tenant.set_condition(ConditionType::Deployed, true, reasons::DEPLOYED, message, now),
            Err((reason, message)) => tenant.set_condition(ConditionType::Deployed, false, reason, message, now),
        };
        let ready_message =
            if ready { "the vCluster control plane is ready" } else { "waiting for the vCluster control plane" };
        tenant.set_condition(
            ConditionType::Ready,
            ready,
            if ready { reasons::READY } else { reasons::DEPLOYING },
            ready_message,
            now,
        );
        let placed = tenant.condition(ConditionType::Placed).is_some_and(|c| c.status);
        tenant.phase = match (placed, tenant.phase) {
            (true, Phase::Deploying | Phase::Ready) if ready && deployed.is_ok() => Phase::Ready,
            (true, Phase::Ready) => Phase::Deploying,
            (_, phase) => phase,
        };
        if book.tenants.get(name) != Some(&tenant) {
            self.store.write(|tx| tx.put_tenant(&tenant))?;
            book.tenants.insert(name.to_string(), tenant);
        }
        Ok(())
    }

    /// Cordons or uncordons a node: a cordoned node gets no new shares and keeps its own.
    pub async fn cordon(&self, node: &str, cordoned: bool) -> Result<NodeView, TenantsError> {
        let mut book = self.book.lock().await;
        let view =
            self.inventory.set_cordoned(node, cordoned)?.ok_or_else(|| TenantsError::NoNode(node.to_string()))?;
        self.refresh_nodes(&mut book)?;
        Ok(view)
    }

    /// Cordons a node and moves every share off it. Shares that fit nowhere stay and their tenants
    /// are Degraded with the reason.
    pub async fn drain(&self, node: &str) -> Result<NodeView, TenantsError> {
        let mut book = self.book.lock().await;
        self.inventory.set_cordoned(node, true)?.ok_or_else(|| TenantsError::NoNode(node.to_string()))?;
        self.refresh_nodes(&mut book)?;
        let decision = book.placement.decide(&Request::DrainNode { node: node.to_string() })?;
        self.commit(&mut book, &decision)?;
        tracing::info!(node, moved = decision.tenants.len(), stuck = decision.unplaced.len(), "node drained");
        self.inventory.get(node).ok_or_else(|| TenantsError::NoNode(node.to_string()))
    }

    /// Deletes a node: its certificate is revoked (its link closes at once), every share moves
    /// off it as a drain would, and then it is forgotten, so that the host cluster's next pass
    /// removes the labels and taints it carried for tenants. Returns the node as it was last seen.
    pub async fn delete_node(&self, node: &str) -> Result<NodeView, TenantsError> {
        let mut book = self.book.lock().await;
        self.inventory.revoke(node)?.ok_or_else(|| TenantsError::NoNode(node.to_string()))?;
        self.inventory.set_cordoned(node, true)?;
        self.refresh_nodes(&mut book)?;
        let decision = book.placement.decide(&Request::NodeLost { node: node.to_string() })?;
        self.commit(&mut book, &decision)?;
        let last = self.inventory.get(node).ok_or_else(|| TenantsError::NoNode(node.to_string()))?;
        self.inventory.forget(node)?;
        book.placement.remove_node(node)?;
        book.nodes.remove(node);
        tracing::info!(node, moved = decision.tenants.len(), stuck = decision.unplaced.len(), "node deleted");
        Ok(last)
    }

    /// One pass of the control loop: fresh node states into placement, shares off Lost nodes,
    /// dedicated nodes bound as they register, degraded tenants retried.
    pub async fn reconcile(&self) -> Result<(), TenantsError> {
        let mut book = self.book.lock().await;
        self.refresh_nodes(&mut book)?;
        for node in self.inventory.lost_nodes() {
            if book.placement.shares_on(&node).is_empty() && book.placement.bound_to(&node).is_none() {
                continue;
            }
            let decision = book.placement.decide(&Request::NodeLost { node: node.clone() })?;
            if self.commit(&mut book, &decision)? {
                tracing::warn!(
                    node,
                    moved = decision.tenants.len(),
                    stuck = decision.unplaced.len(),
                    "node lost: shares re-placed"
                );
            }
        }
        let waiting: Vec<String> = book
            .tenants
            .values()
            .filter(|t| matches!(t.phase, Phase::Provisioning | Phase::Degraded))
            .map(|t| t.name.clone())
            .collect();
        for tenant in waiting {
            let decision = book.placement.decide(&Request::Reconcile { tenant: tenant.clone() })?;
            if self.commit(&mut book, &decision)? {
                tracing::info!(tenant, "tenant placement completed");
            } else {
                self.recover(&mut book, &tenant)?;
            }
        }
        Ok(())
    }

    /// A tenant Degraded because a share was stuck on a lost or drained node is whole again once
    /// every node holding its shares is Ready and schedulable (the node came back, or was
    /// uncordoned), though nothing about its placement changed.
    fn recover(&self, book: &mut Book, name: &str) -> Result<(), TenantsError> {
        let Some(tenant) = book.tenants.get(name) else { return Ok(()) };
        let stuck = tenant.phase == Phase::Degraded
            && tenant.condition(ConditionType::Placed).is_some_and(|c| c.reason == reasons::NODE_LOST);
        let healthy = |node: &str| book.nodes.get(node).is_some_and(|n| n.ready && n.schedulable);
        if !stuck || !tenant.placement.nodes().into_iter().all(healthy) {
            return Ok(());
        }
        let mut tenant = tenant.clone();
        derive_phase(&mut tenant, &[], now_ms());
        self.store.write(|tx| tx.put_tenant(&tenant))?;
        tracing::info!(tenant = name, phase = ?tenant.phase, "every node of the tenant is back: no longer degraded");
        book.tenants.insert(name.to_string(), tenant);
        Ok(())
    }

    fn refresh_nodes(&self, book: &mut Book) -> Result<(), TenantsError> {
        for node in self.inventory.placement_nodes() {
            if book.nodes.get(&node.name) != Some(&node) {
                book.placement.update_node(node.clone())?;
                book.nodes.insert(node.name.clone(), node);
            }
        }
        Ok(())
    }

    /// Records `decision`, then acts on it. Returns false (and writes nothing) when it changes nothing.
    fn commit(&self, book: &mut Book, decision: &Decision) -> Result<bool, TenantsError> {
        let now = now_ms();
        let mut changed: Vec<Tenant> = Vec::new();
        let mut touched_nodes = BTreeSet::new();
        let mut names: BTreeSet<&str> = decision.tenants.iter().map(|t| t.name.as_str()).collect();
        names.extend(decision.unplaced.iter().map(|u| u.tenant.as_str()));
        for name in names {
            let Some(mut tenant) = book.tenants.get(name).cloned().or_else(|| {
                decision.tenants.iter().find(|t| t.name == name).map(|t| Tenant {
                    name: t.name.clone(),
                    plan: t.plan.clone(),
                    phase: Phase::Pending,
                    conditions: Vec::new(),
                    placement: Default::default(),
                })
            }) else {
                continue;
            };
            touched_nodes.extend(tenant.placement.nodes().into_iter().map(String::from));
            if let Some(next) = decision.tenants.iter().find(|t| t.name == name) {
                tenant.plan = next.plan.clone();
                tenant.placement = next.placement.clone();
            }
            touched_nodes.extend(tenant.placement.nodes().into_iter().map(String::from));
            let unplaced: Vec<&placement::Unplaced> = decision.unplaced.iter().filter(|u| u.tenant == name).collect();
            derive_phase(&mut tenant, &unplaced, now);
            if book.tenants.get(name) != Some(&tenant) {
                changed.push(tenant);
            }
        }
        for name in &decision.removed {
            if let Some(tenant) = book.tenants.get(name) {
                touched_nodes.extend(tenant.placement.nodes().into_iter().map(String::from));
            }
        }
        if changed.is_empty()
            && decision.removed.is_empty()
            && decision.provision.is_empty()
            && decision.cancel.is_empty()
            && decision.released.is_empty()
        {
            return Ok(false);
        }

        // 1. Durable first.
        self.store.write(|tx| {
            for tenant in &changed {
                tx.put_tenant(tenant)?;
            }
            for name in &decision.removed {
                tx.remove_tenant(name)?;
            }
            Ok::<_, StoreError>(())
        })?;
        // 2. Then in memory, then on the nodes and the provisioner.
        book.placement.apply(decision);
        let metrics = self.inventory.metrics();
        for tenant in changed {
            let moved = book.tenants.get(&tenant.name).is_none_or(|before| before.placement != tenant.placement);
            if moved && !tenant.placement.nodes().is_empty() {
                metrics.placement_made(tenant.plan.kind());
            }
            tracing::info!(tenant = %tenant.name, phase = %tenant.phase, nodes = ?tenant.placement.nodes(), "tenant placement recorded");
            book.tenants.insert(tenant.name.clone(), tenant);
        }
        for name in &decision.removed {
            book.tenants.remove(name);
            book.requested.remove(name);
        }
        let waiting: Vec<String> = book.requested.keys().cloned().collect();
        for name in waiting {
            self.note_placed(book, &name);
        }
        for request in &decision.provision {
            self.provisioner.provision(request);
        }
        for request in &decision.cancel {
            self.provisioner.cancel(request);
        }
        touched_nodes.extend(decision.released.iter().cloned());
        self.push_specs(book, &touched_nodes)?;
        Ok(true)
    }

    /// Observes how long `name` waited to be placed, once it is placed whole after a request.
    fn note_placed(&self, book: &mut Book, name: &str) {
        let Some(tenant) = book.tenants.get(name) else {
            book.requested.remove(name);
            return;
        };
        if tenant.phase == Phase::Deleting {
            book.requested.remove(name);
        } else if tenant.condition(ConditionType::Placed).is_some_and(|c| c.status) {
            if let Some(asked) = book.requested.remove(name) {
                self.inventory.metrics().placement_completed(tenant.plan.kind(), asked.elapsed());
            }
        }
    }

    /// Sends each node in `nodes` the allocations placement gives it, decided whole here (see
    /// [`AllocationPlan`]).
    fn push_specs(&self, book: &Book, nodes: &BTreeSet<String>) -> Result<(), StoreError> {
        for node in nodes {
            let mut allocations = Vec::new();
            for (tenant, _) in book.placement.shares_on(node) {
                let Some(share) = book.tenants.get(tenant).and_then(|t| t.placement.share_on(node)) else { continue };
                allocations.push(self.allocations.allocation(tenant, share.size, share.control_plane));
            }
            if let (Some(tenant), Some(state)) = (book.placement.bound_to(node), book.nodes.get(node)) {
                // A dedicated node gives its tenant everything it can.
                let all = ShareSize {
                    cpu_millis: state.allocatable.cpu_millis,
                    memory_bytes: state.allocatable.memory_bytes,
                    pods: state.allocatable.pods,
                };
                allocations.push(self.allocations.allocation(tenant, all, false));
            }
            self.inventory.set_tenants(node, allocations)?;
        }
        Ok(())
    }
}
