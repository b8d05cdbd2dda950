//! The placement engine: nodes, tenants and the free-room indexes, and the decision for each request.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use hexa_shared::tenant::{DedicatedPlan, MAX_SPREAD, Placement, Plan, Share, SharedPlan, validate_tenant};

use super::room::{Dim, Room, live_memory, usable_capacity};
use super::{
    Decision, NodePool, NodeState, PlacementConfig, PlacementError, ProvisionRequest, Request, Strategy, TenantState,
    Unplaced, baselines,
};

/// Index of a node in [`PlacementState::nodes`], which is sorted by name: comparing ids compares names.
pub(super) type NodeId = u32;

#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) view: NodeState,
    /// What shares may reserve in total (zero unless the node is in the shared pool).
    pub(super) cap: Room,
    /// What the shares on this node reserve.
    pub(super) reserved: Room,
    /// `MemAvailable` less headroom, less memory placed here since the view was taken.
    live_memory: u64,
    /// Tenant -> index of its share on this node.
    shares: BTreeMap<String, u32>,
    /// The tenant whose placement binds this dedicated node.
    bound_to: Option<String>,
    /// The free room the index holds for this node; `Some` exactly when shares may go here.
    indexed: Option<Indexed>,
}

#[derive(Debug, Clone, Copy)]
struct Indexed {
    free: Room,
    used: bool,
}

impl Slot {
    fn eligible(&self) -> bool {
        self.view.pool == NodePool::Shared && self.view.ready && self.view.schedulable
    }

    fn free_with(&self, reserved: &Room, live_memory: u64) -> Room {
        let room = self.cap.saturating_sub(reserved);
        Room { memory_bytes: room.memory_bytes.min(live_memory), ..room }
    }

    fn dedicated(&self) -> Option<(Option<&str>, Option<&str>)> {
        match &self.view.pool {
            NodePool::Dedicated { tenant, node_class } => Some((tenant.as_deref(), node_class.as_deref())),
            _ => None,
        }
    }
}

/// Reservations a decision has made or released on nodes but not yet committed.
#[derive(Debug, Default)]
pub(super) struct Overlay {
    entries: Vec<(NodeId, Room, Room)>,
}

impl Overlay {
    fn entry(&mut self, id: NodeId) -> &mut (NodeId, Room, Room) {
        let at = match self.entries.iter().position(|e| e.0 == id) {
            Some(at) => at,
            None => {
                self.entries.push((id, Room::default(), Room::default()));
                self.entries.len() - 1
            }
        };
        &mut self.entries[at]
    }

    fn add(&mut self, id: NodeId, room: &Room) {
        let entry = self.entry(id);
        entry.1 = entry.1.saturating_add(room);
    }

    fn release(&mut self, id: NodeId, room: &Room) {
        let entry = self.entry(id);
        entry.2 = entry.2.saturating_add(room);
    }

    pub(super) fn get(&self, id: NodeId) -> Option<(Room, Room)> {
        self.entries.iter().find(|e| e.0 == id).map(|e| (e.1, e.2))
    }

    pub(super) fn contains(&self, id: NodeId) -> bool {
        self.entries.iter().any(|e| e.0 == id)
    }
}

#[derive(Debug, Clone, Default)]
struct FreeIndex {
    used_cpu: BTreeSet<(u64, NodeId)>,
    used_memory: BTreeSet<(u64, NodeId)>,
    /// Empty nodes by room on one resource, then on the other, largest last; equal nodes by name.
    empty_cpu: BTreeSet<(u64, u64, Reverse<NodeId>)>,
    empty_memory: BTreeSet<(u64, u64, Reverse<NodeId>)>,
}

/// Nodes and tenants with indexes for fast placement. Build it from the inventory and the stored
/// tenants, ask it for decisions with [`decide`](Self::decide) (which never changes it), and commit
/// a decision with [`apply`](Self::apply) once it is persisted.
#[derive(Debug, Clone)]
pub struct PlacementState {
    config: PlacementConfig,
    pub(super) nodes: Vec<Slot>,
    by_name: BTreeMap<String, NodeId>,
    dedicated: Vec<NodeId>,
    /// Nodes largest first (memory, then CPU, then name): the order first fit tries them in.
    pub(super) largest_first: Vec<NodeId>,
    tenants: BTreeMap<String, TenantState>,
    index: FreeIndex,
    /// Total usable capacity of the nodes shares may go to; the scale for "dominant resource".
    fleet: Room,
}

impl PlacementState {
    /// Builds the state. Shares on nodes missing from `nodes` stay recorded (a `Reconcile` moves
    /// them); a dedicated node claimed by two tenants stays with the first by name.
    pub fn new(
        config: PlacementConfig,
        mut nodes: Vec<NodeState>,
        tenants: Vec<TenantState>,
    ) -> Result<PlacementState, PlacementError> {
        config.validate()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = nodes.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(PlacementError::DuplicateNode { node: pair[0].name.clone() });
        }
        let mut state = PlacementState {
            nodes: Vec::with_capacity(nodes.len()),
            by_name: BTreeMap::new(),
            dedicated: Vec::new(),
            largest_first: Vec::new(),
            tenants: BTreeMap::new(),
            index: FreeIndex::default(),
            fleet: Room::default(),
            config,
        };
        for (id, view) in nodes.into_iter().enumerate() {
            let id = node_id(id);
            state.by_name.insert(view.name.clone(), id);
            if matches!(view.pool, NodePool::Dedicated { .. }) {
                state.dedicated.push(id);
            }
            let slot = state.slot_for(view);
            state.nodes.push(slot);
        }
        for tenant in tenants {
            if state.tenants.contains_key(&tenant.name) {
                return Err(PlacementError::TenantExists { tenant: tenant.name });
            }
            state.tenants.insert(tenant.name.clone(), tenant);
        }
        let tenants = std::mem::take(&mut state.tenants);
        for tenant in tenants.values() {
            state.account(tenant, None, &mut BTreeSet::new());
        }
        state.tenants = tenants;
        for id in 0..state.nodes.len() {
            state.index(node_id(id));
        }
        state.sort_largest_first();
        Ok(state)
    }

    fn slot_for(&self, view: NodeState) -> Slot {
        let cap = if view.pool == NodePool::Shared {
            usable_capacity(&view.allocatable, &self.config)
        } else {
            Room::default()
        };
        let live_memory = live_memory(&view.allocatable, view.memory_available_bytes, &self.config);
        Slot {
            view,
            cap,
            reserved: Room::default(),
            live_memory,
            shares: BTreeMap::new(),
            bound_to: None,
            indexed: None,
        }
    }

    fn sort_largest_first(&mut self) {
        let mut order: Vec<NodeId> = (0..self.nodes.len()).map(node_id).collect();
        order.sort_by_key(|id| {
            let cap = self.slot(*id).cap;
            (Reverse(cap.memory_bytes), Reverse(cap.cpu_millis), *id)
        });
        self.largest_first = order;
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantState> {
        self.tenants.get(name)
    }

    /// All tenants, by name.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantState> {
        self.tenants.values()
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.nodes.iter().map(|s| &s.view)
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.id(name).map(|id| &self.slot(id).view)
    }

    /// What shares may reserve on `node` in total (zero for nodes outside the shared pool).
    pub fn capacity(&self, node: &str) -> Option<Room> {
        self.id(node).map(|id| self.slot(id).cap)
    }

    /// What the shares on `node` reserve.
    pub fn reserved(&self, node: &str) -> Option<Room> {
        self.id(node).map(|id| self.slot(id).reserved)
    }

    /// Room left on `node` for a new share (whether or not the node takes new shares).
    pub fn free_room(&self, node: &str) -> Option<Room> {
        self.id(node).map(|id| self.free(id, &Overlay::default()))
    }

    /// The tenants with a share on `node` and the index of that share, by tenant name.
    pub fn shares_on(&self, node: &str) -> Vec<(&str, u32)> {
        self.id(node).map(|id| self.slot(id).shares.iter().map(|(t, i)| (t.as_str(), *i)).collect()).unwrap_or_default()
    }

    /// The tenant a dedicated node is bound to by a placement.
    pub fn bound_to(&self, node: &str) -> Option<&str> {
        self.id(node).and_then(|id| self.slot(id).bound_to.as_deref())
    }

    /// Nodes holding at least one share or bound to a tenant.
    pub fn nodes_in_use(&self) -> usize {
        self.nodes.iter().filter(|s| !s.shares.is_empty() || s.bound_to.is_some()).count()
    }

    fn id(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    pub(super) fn slot(&self, id: NodeId) -> &Slot {
        &self.nodes[id as usize]
    }

    /// Room on node `id` once the decision's pending reservations are counted.
    pub(super) fn free(&self, id: NodeId, overlay: &Overlay) -> Room {
        let slot = self.slot(id);
        match overlay.get(id) {
            None => slot.free_with(&slot.reserved, slot.live_memory),
            Some((added, released)) => {
                let reserved = slot.reserved.saturating_sub(&released).saturating_add(&added);
                // A share replaced on the same node only takes its growth from live memory.
                let growth = added.memory_bytes.saturating_sub(released.memory_bytes);
                slot.free_with(&reserved, slot.live_memory.saturating_sub(growth))
            }
        }
    }

    /// What node `id` holds once the decision's pending reservations are counted.
    pub(super) fn reserved_with(&self, id: NodeId, overlay: &Overlay) -> Room {
        let slot = self.slot(id);
        match overlay.get(id) {
            None => slot.reserved,
            Some((added, released)) => slot.reserved.saturating_sub(&released).saturating_add(&added),
        }
    }

    /// True when shares may go to node `id`.
    pub(super) fn takes_shares(&self, id: NodeId) -> bool {
        self.slot(id).indexed.is_some()
    }

    // ----- Index maintenance -----

    fn index(&mut self, id: NodeId) {
        let slot = &self.nodes[id as usize];
        if !slot.eligible() {
            return;
        }
        let free = slot.free_with(&slot.reserved, slot.live_memory);
        let used = !slot.shares.is_empty();
        let cap = slot.cap;
        if used {
            self.index.used_cpu.insert((free.cpu_millis, id));
            self.index.used_memory.insert((free.memory_bytes, id));
        } else {
            self.index.empty_cpu.insert((free.cpu_millis, free.memory_bytes, Reverse(id)));
            self.index.empty_memory.insert((free.memory_bytes, free.cpu_millis, Reverse(id)));
        }
        self.fleet = self.fleet.saturating_add(&cap);
        self.nodes[id as usize].indexed = Some(Indexed { free, used });
    }

    fn unindex(&mut self, id: NodeId) {
        let slot = &mut self.nodes[id as usize];
        let Some(Indexed { free, used }) = slot.indexed.take() else { return };
        let cap = slot.cap;
        if used {
            self.index.used_cpu.remove(&(free.cpu_millis, id));
            self.index.used_memory.remove(&(free.memory_bytes, id));
        } else {
            self.index.empty_cpu.remove(&(free.cpu_millis, free.memory_bytes, Reverse(id)));
            self.index.empty_memory.remove(&(free.memory_bytes, free.cpu_millis, Reverse(id)));
        }
        self.fleet = self.fleet.saturating_sub(&cap);
    }

    /// Adds a tenant's placement to the nodes' accounting. With `charge`, the memory each share
    /// grew by (over what the tenant held on that node before) is taken from the node's live memory;
    /// without it (building from stored state) the reports are assumed to show existing tenants.
    fn account(
        &mut self,
        tenant: &TenantState,
        charge: Option<&BTreeMap<NodeId, u64>>,
        touched: &mut BTreeSet<NodeId>,
    ) {
        for share in &tenant.placement.shares {
            let Some(id) = self.id(&share.node) else { continue };
            let room = Room::of(&share.size);
            let slot = &mut self.nodes[id as usize];
            slot.reserved = slot.reserved.saturating_add(&room);
            slot.shares.insert(tenant.name.clone(), share.index);
            if let Some(previous) = charge {
                let before = previous.get(&id).copied().unwrap_or(0);
                slot.live_memory = slot.live_memory.saturating_sub(room.memory_bytes.saturating_sub(before));
            }
            touched.insert(id);
        }
        for node in &tenant.placement.dedicated_nodes {
            let Some(id) = self.id(node) else { continue };
            let slot = &mut self.nodes[id as usize];
            if slot.bound_to.is_none() {
                slot.bound_to = Some(tenant.name.clone());
            }
            touched.insert(id);
        }
    }

    /// Removes a tenant's placement from the nodes' accounting; returns the memory it held per node.
    fn unaccount(&mut self, tenant: &TenantState, touched: &mut BTreeSet<NodeId>) -> BTreeMap<NodeId, u64> {
        let mut memory = BTreeMap::new();
        for share in &tenant.placement.shares {
            let Some(id) = self.id(&share.node) else { continue };
            let room = Room::of(&share.size);
            let slot = &mut self.nodes[id as usize];
            slot.reserved = slot.reserved.saturating_sub(&room);
            slot.shares.remove(&tenant.name);
            memory.insert(id, room.memory_bytes);
            touched.insert(id);
        }
        for node in &tenant.placement.dedicated_nodes {
            let Some(id) = self.id(node) else { continue };
            let slot = &mut self.nodes[id as usize];
            if slot.bound_to.as_deref() == Some(tenant.name.as_str()) {
                slot.bound_to = None;
            }
            touched.insert(id);
        }
        memory
    }

    // ----- Commit -----

    /// Commits a decision made by [`decide`](Self::decide) on this state. New shares are charged
    /// against the nodes' last `MemAvailable` until [`update_node`](Self::update_node) brings a
    /// fresh report, so a burst of placements between reports cannot promise the same memory twice.
    pub fn apply(&mut self, decision: &Decision) {
        for tenant in &decision.tenants {
            self.set_tenant(Some(tenant), &tenant.name);
        }
        for name in &decision.removed {
            self.set_tenant(None, name);
        }
    }

    fn set_tenant(&mut self, tenant: Option<&TenantState>, name: &str) {
        let mut touched = BTreeSet::new();
        let previous = self.tenants.remove(name);
        let mut memory = BTreeMap::new();
        if let Some(previous) = &previous {
            memory = self.unaccount(previous, &mut touched);
        }
        if let Some(tenant) = tenant {
            self.account(tenant, Some(&memory), &mut touched);
            self.tenants.insert(name.to_string(), tenant.clone());
        }
        // A dedicated node freed by this tenant may still be claimed by another one's placement.
        if let Some(previous) = &previous {
            for node in &previous.placement.dedicated_nodes {
                if let Some(id) = self.id(node)
                    && self.slot(id).bound_to.is_none()
                    && let Some(owner) = self.claimant(node)
                {
                    self.nodes[id as usize].bound_to = Some(owner);
                }
            }
        }
        for id in touched {
            self.unindex(id);
            self.index(id);
        }
    }

    fn claimant(&self, node: &str) -> Option<String> {
        self.tenants.values().find(|t| t.placement.dedicated_nodes.iter().any(|n| n == node)).map(|t| t.name.clone())
    }

    /// Takes a fresh view of a node (a report, a cordon, a health change). A node not seen
    /// before is added. Resets the node's live memory to the report's.
    pub fn update_node(&mut self, view: NodeState) -> Result<(), PlacementError> {
        let Some(id) = self.id(&view.name) else {
            let mut nodes: Vec<NodeState> = self.nodes().cloned().collect();
            nodes.push(view);
            return self.rebuild(nodes);
        };
        if self.slot(id).view.pool != view.pool {
            let nodes: Vec<NodeState> =
                self.nodes().map(|n| if n.name == view.name { view.clone() } else { n.clone() }).collect();
            return self.rebuild(nodes);
        }
        self.unindex(id);
        let fresh = self.slot_for(view);
        let slot = &mut self.nodes[id as usize];
        let resized = slot.cap != fresh.cap;
        slot.cap = fresh.cap;
        slot.live_memory = fresh.live_memory;
        slot.view = fresh.view;
        self.index(id);
        if resized {
            self.sort_largest_first();
        }
        Ok(())
    }

    /// Forgets a node (deleted from the inventory). Shares on it stay recorded until re-placed.
    pub fn remove_node(&mut self, name: &str) -> Result<(), PlacementError> {
        let nodes: Vec<NodeState> = self.nodes().filter(|n| n.name != name).cloned().collect();
        self.rebuild(nodes)
    }

    fn rebuild(&mut self, nodes: Vec<NodeState>) -> Result<(), PlacementError> {
        let tenants = self.tenants.values().cloned().collect();
        *self = PlacementState::new(self.config.clone(), nodes, tenants)?;
        Ok(())
    }

    // ----- Decisions -----

    /// Decides `request` without changing the state.
    pub fn decide(&self, request: &Request) -> Result<Decision, PlacementError> {
        let mut decision = Decision::default();
        match request {
            Request::Place { tenant, plan } => {
                if self.tenants.contains_key(tenant) {
                    return Err(PlacementError::TenantExists { tenant: tenant.clone() });
                }
                self.validate(tenant, plan)?;
                let current = TenantState { name: tenant.clone(), plan: plan.clone(), placement: Placement::default() };
                let placement = self.plan_tenant(&current, plan, &mut decision)?;
                decision.tenants.push(TenantState { placement, ..current });
            }
            Request::ChangePlan { tenant, plan } => {
                let current = self.existing(tenant)?;
                self.validate(tenant, plan)?;
                let placement = self.plan_tenant(current, plan, &mut decision)?;
                self.record(current, plan, placement, &mut decision);
            }
            Request::Reconcile { tenant } => {
                let current = self.existing(tenant)?;
                let placement = self.plan_tenant(current, &current.plan, &mut decision)?;
                self.record(current, &current.plan, placement, &mut decision);
            }
            Request::DrainNode { node } | Request::NodeLost { node } => {
                let id = self.id(node).ok_or_else(|| PlacementError::UnknownNode { node: node.clone() })?;
                self.evacuate(id, &mut decision);
            }
            Request::Delete { tenant } => {
                let current = self.existing(tenant)?;
                decision.removed.push(tenant.clone());
                decision.released = current.placement.dedicated_nodes.clone();
                if let Plan::Dedicated(plan) = &current.plan
                    && current.placement.awaiting_nodes > 0
                {
                    decision.cancel.push(ProvisionRequest {
                        tenant: tenant.clone(),
                        node_class: plan.node_class.clone(),
                        count: current.placement.awaiting_nodes,
                    });
                }
            }
        }
        decision.tenants.sort_by(|a, b| a.name.cmp(&b.name));
        decision.released.sort();
        decision.released.dedup();
        Ok(decision)
    }

    fn existing(&self, tenant: &str) -> Result<&TenantState, PlacementError> {
        self.tenants.get(tenant).ok_or_else(|| PlacementError::UnknownTenant { tenant: tenant.to_string() })
    }

    fn validate(&self, tenant: &str, plan: &Plan) -> Result<(), PlacementError> {
        validate_tenant(tenant, plan, &self.config.node_classes)
            .map_err(|source| PlacementError::InvalidPlan { tenant: tenant.to_string(), source })
    }

    fn record(&self, current: &TenantState, plan: &Plan, placement: Placement, decision: &mut Decision) {
        if current.plan != *plan || current.placement != placement {
            decision.tenants.push(TenantState { name: current.name.clone(), plan: plan.clone(), placement });
        }
    }

    /// The placement of `current` under `plan`, keeping what can stay.
    fn plan_tenant(
        &self,
        current: &TenantState,
        plan: &Plan,
        decision: &mut Decision,
    ) -> Result<Placement, PlacementError> {
        match plan {
            Plan::Shared(shared) => {
                let mut overlay = Overlay::default();
                let shares = self.place_shared(&current.name, shared, &current.placement.shares, None, &mut overlay)?;
                // Leaving the dedicated plan: its nodes are released, its outstanding VMs cancelled.
                decision.released.extend(current.placement.dedicated_nodes.iter().cloned());
                if let Plan::Dedicated(old) = &current.plan
                    && current.placement.awaiting_nodes > 0
                {
                    decision.cancel.push(ProvisionRequest {
                        tenant: current.name.clone(),
                        node_class: old.node_class.clone(),
                        count: current.placement.awaiting_nodes,
                    });
                }
                Ok(Placement { shares, dedicated_nodes: Vec::new(), awaiting_nodes: 0 })
            }
            Plan::Dedicated(dedicated) => Ok(self.plan_dedicated(current, dedicated, None, decision)),
        }
    }

    /// Chooses nodes for the shares of `plan`. Shares already placed stay on their node when it is
    /// still in the shared pool and the share does not grow, or when the node takes new shares and
    /// has room for the growth.
    fn place_shared(
        &self,
        tenant: &str,
        plan: &SharedPlan,
        current: &[Share],
        avoid: Option<NodeId>,
        overlay: &mut Overlay,
    ) -> Result<Vec<Share>, PlacementError> {
        let size = plan.share_size();
        let need = Room::of(&size);
        let spread = plan.spread as usize;
        let mut held: Vec<&Share> = current.iter().collect();
        held.sort_by_key(|s| s.index);
        for share in &held {
            if let Some(id) = self.id(&share.node) {
                overlay.release(id, &Room::of(&share.size));
            }
        }
        let mut chosen: Vec<NodeId> = Vec::with_capacity(spread + 1);
        for share in held {
            if chosen.len() == spread {
                break;
            }
            let Some(id) = self.id(&share.node) else { continue };
            if Some(id) == avoid || chosen.contains(&id) || self.slot(id).view.pool != NodePool::Shared {
                continue;
            }
            let grows = !Room::of(&share.size).fits(&need);
            if !grows || (self.takes_shares(id) && self.free(id, overlay).fits(&need)) {
                overlay.add(id, &need);
                chosen.push(id);
            }
        }
        let mut exclude = chosen.clone();
        exclude.extend(avoid);
        while chosen.len() < spread {
            let Some(id) = self.choose(&need, &exclude, overlay) else {
                return Err(self.explain(tenant, Some(plan), plan.spread, &need, &chosen, avoid, overlay));
            };
            overlay.add(id, &need);
            chosen.push(id);
            exclude.push(id);
        }
        Ok(chosen
            .into_iter()
            .enumerate()
            .map(|(index, id)| {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                Share {
                    index,
                    node: self.slot(id).view.name.clone(),
                    size,
                    control_plane: index < u32::from(plan.replicas),
                }
            })
            .collect())
    }

    /// Binds dedicated nodes for `plan`: keeps the bound nodes of the right class, binds nodes
    /// enrolled for this tenant and then free ones, and asks for the rest. Shares the tenant still
    /// has (moving from the shared plan) stay until every node is bound.
    fn plan_dedicated(
        &self,
        current: &TenantState,
        plan: &DedicatedPlan,
        avoid: Option<NodeId>,
        decision: &mut Decision,
    ) -> Placement {
        let tenant = current.name.as_str();
        let class = plan.node_class.as_str();
        let count = plan.count as usize;
        let usable_for_tenant = |slot: &Slot| match slot.dedicated() {
            Some((enrolled_for, Some(node_class))) => node_class == class && enrolled_for.is_none_or(|t| t == tenant),
            _ => false,
        };
        let mut kept: Vec<NodeId> = Vec::new();
        for node in &current.placement.dedicated_nodes {
            match self.id(node) {
                Some(id) if Some(id) != avoid && usable_for_tenant(self.slot(id)) && !kept.contains(&id) => {
                    kept.push(id)
                }
                _ => decision.released.push(node.clone()),
            }
        }
        if kept.len() > count {
            // Give back the nodes that are not Ready first, then the last by name.
            kept.sort_by_key(|id| (!self.slot(*id).view.ready, *id));
            for id in kept.split_off(count) {
                decision.released.push(self.slot(id).view.name.clone());
            }
        }
        let mut candidates: Vec<(bool, NodeId)> = self
            .dedicated
            .iter()
            .copied()
            .filter(|id| Some(*id) != avoid && !kept.contains(id))
            .filter(|id| {
                let slot = self.slot(*id);
                slot.view.ready
                    && slot.view.schedulable
                    && usable_for_tenant(slot)
                    && slot.bound_to.as_deref().is_none_or(|t| t == tenant)
            })
            .map(|id| (self.slot(id).dedicated().and_then(|d| d.0) != Some(tenant), id))
            .collect();
        candidates.sort();
        let wanted = count.saturating_sub(kept.len());
        let bound: Vec<(bool, NodeId)> = candidates.into_iter().take(wanted).collect();
        let shortfall = u32::try_from(wanted - bound.len()).unwrap_or(u32::MAX);

        // Nodes enrolled for this tenant are the VMs it asked for: they fulfil outstanding requests.
        let old_class = match &current.plan {
            Plan::Dedicated(old) => Some(old.node_class.as_str()),
            Plan::Shared(_) => None,
        };
        let outstanding = if old_class == Some(class) {
            let arrived = u32::try_from(bound.iter().filter(|(free_pool, _)| !free_pool).count()).unwrap_or(u32::MAX);
            current.placement.awaiting_nodes.saturating_sub(arrived)
        } else {
            if let Some(old_class) = old_class
                && current.placement.awaiting_nodes > 0
            {
                decision.cancel.push(ProvisionRequest {
                    tenant: tenant.to_string(),
                    node_class: old_class.to_string(),
                    count: current.placement.awaiting_nodes,
                });
            }
            0
        };
        if shortfall > outstanding {
            decision.provision.push(ProvisionRequest {
                tenant: tenant.to_string(),
                node_class: class.to_string(),
                count: shortfall - outstanding,
            });
        } else if shortfall < outstanding {
            decision.cancel.push(ProvisionRequest {
                tenant: tenant.to_string(),
                node_class: class.to_string(),
                count: outstanding - shortfall,
            });
        }
        let mut nodes: Vec<NodeId> = kept.into_iter().chain(bound.into_iter().map(|(_, id)| id)).collect();
        nodes.sort_unstable();
        Placement {
            shares: if shortfall == 0 { Vec::new() } else { current.placement.shares.clone() },
            dedicated_nodes: nodes.into_iter().map(|id| self.slot(id).view.name.clone()).collect(),
            awaiting_nodes: shortfall,
        }
    }

    /// Moves everything off node `id`: each share to another node (largest shares first, other
    /// shares of the tenant stay put), and for the dedicated tenant a replacement node.
    fn evacuate(&self, id: NodeId, decision: &mut Decision) {
        let slot = self.slot(id);
        match &slot.view.pool {
            NodePool::Server => {}
            NodePool::Dedicated { .. } => {
                let Some(tenant) = slot.bound_to.as_deref().and_then(|t| self.tenants.get(t)) else { return };
                let placement = match &tenant.plan {
                    Plan::Dedicated(plan) => self.plan_dedicated(tenant, plan, Some(id), decision),
                    Plan::Shared(_) => {
                        let mut placement = tenant.placement.clone();
                        placement.dedicated_nodes.retain(|n| *n != slot.view.name);
                        decision.released.push(slot.view.name.clone());
                        placement
                    }
                };
                self.record(tenant, &tenant.plan, placement, decision);
            }
            NodePool::Shared => {
                let fleet = self.fleet;
                let mut moving: Vec<(&TenantState, &Share)> = slot
                    .shares
                    .keys()
                    .filter_map(|name| self.tenants.get(name))
                    .filter_map(|t| t.placement.share_on(&slot.view.name).map(|s| (t, s)))
                    .collect();
                let weight = |s: &Share| {
                    let room = Room::of(&s.size);
                    (u128::from(room.cpu_millis) * u128::from(fleet.memory_bytes))
                        .max(u128::from(room.memory_bytes) * u128::from(fleet.cpu_millis))
                };
                moving.sort_by(|a, b| weight(b.1).cmp(&weight(a.1)).then_with(|| a.0.name.cmp(&b.0.name)));
                let mut overlay = Overlay::default();
                for (tenant, share) in moving {
                    let need = Room::of(&share.size);
                    let others: Vec<NodeId> = tenant
                        .placement
                        .shares
                        .iter()
                        .filter(|s| s.index != share.index)
                        .filter_map(|s| self.id(&s.node))
                        .collect();
                    let mut exclude = others.clone();
                    exclude.push(id);
                    match self.choose(&need, &exclude, &overlay) {
                        Some(target) => {
                            overlay.add(target, &need);
                            let mut placement = tenant.placement.clone();
                            for s in &mut placement.shares {
                                if s.index == share.index {
                                    s.node = self.slot(target).view.name.clone();
                                }
                            }
                            decision.tenants.push(TenantState { placement, ..tenant.clone() });
                        }
                        None => {
                            let plan = match &tenant.plan {
                                Plan::Shared(plan) => Some(plan),
                                Plan::Dedicated(_) => None,
                            };
                            let needed = u32::try_from(tenant.placement.shares.len()).unwrap_or(u32::MAX);
                            let error = self.explain(&tenant.name, plan, needed, &need, &others, Some(id), &overlay);
                            decision.unplaced.push(Unplaced {
                                tenant: tenant.name.clone(),
                                share: share.index,
                                node: slot.view.name.clone(),
                                reason: error.to_string(),
                            });
                        }
                    }
                }
            }
        }
    }

    // ----- Choosing nodes -----

    /// The node for a share of size `need`, not one of `exclude`, or `None` when none has room.
    pub(super) fn choose(&self, need: &Room, exclude: &[NodeId], overlay: &Overlay) -> Option<NodeId> {
        match self.config.strategy {
            Strategy::DominantBestFit => self.best_fit(need, exclude, overlay),
            other => baselines::choose(self, other, need, exclude, overlay),
        }
    }

    fn best_fit(&self, need: &Room, exclude: &[NodeId], overlay: &Overlay) -> Option<NodeId> {
        let dim = need.dominant(&self.fleet);
        let (used, empty) = match dim {
            Dim::Cpu => (&self.index.used_cpu, &self.index.empty_cpu),
            Dim::Memory => (&self.index.used_memory, &self.index.empty_memory),
        };
        let wanted = need.get(dim);
        let mut best: Option<(u64, NodeId)> = None;
        for &(free, id) in used.range((wanted, 0)..) {
            if exclude.contains(&id) || overlay.contains(id) {
                continue;
            }
            if self.slot(id).indexed.is_some_and(|ix| ix.free.fits(need)) {
                best = Some((free, id));
                break;
            }
        }
        // Nodes this decision already put something on count as used, with their pending room.
        for &(id, _, _) in &overlay.entries {
            if exclude.contains(&id) || !self.takes_shares(id) {
                continue;
            }
            let free = self.free(id, overlay);
            if free.fits(need) && best.is_none_or(|b| (free.get(dim), id) < b) {
                best = Some((free.get(dim), id));
            }
        }
        if let Some((_, id)) = best {
            return Some(id);
        }
        // Open the empty node with the most room on the dominant resource, then on the other one.
        for &(free, _, Reverse(id)) in empty.iter().rev() {
            if free < wanted {
                break;
            }
            if exclude.contains(&id) || overlay.contains(id) {
                continue;
            }
            if self.slot(id).indexed.is_some_and(|ix| ix.free.fits(need)) {
                return Some(id);
            }
        }
        None
    }

    /// Why no node could be found for a share of size `need`, in the most useful terms.
    #[allow(clippy::too_many_arguments)]
    fn explain(
        &self,
        tenant: &str,
        plan: Option<&SharedPlan>,
        needed: u32,
        need: &Room,
        chosen: &[NodeId],
        avoid: Option<NodeId>,
        overlay: &Overlay,
    ) -> PlacementError {
        let available: Vec<NodeId> =
            (0..self.nodes.len()).map(node_id).filter(|id| self.takes_shares(*id) && Some(*id) != avoid).collect();
        let share = hexa_shared::tenant::ShareSize {
            cpu_millis: need.cpu_millis,
            memory_bytes: need.memory_bytes,
            pods: u32::try_from(need.pods).unwrap_or(u32::MAX),
        };
        if available.is_empty() {
            return PlacementError::NoSharedNodes { tenant: tenant.to_string(), needed };
        }
        if needed as usize > available.len() {
            return PlacementError::TooFewNodes { tenant: tenant.to_string(), needed, available: available.len() };
        }
        if !available.iter().any(|id| self.slot(*id).cap.fits(need)) {
            let dim = need.dominant(&self.fleet);
            let largest = available
                .iter()
                .map(|id| self.slot(*id).cap)
                .max_by_key(|cap| (cap.get(dim), cap.cpu_millis, cap.memory_bytes))
                .unwrap_or_default();
            let hint = plan
                .and_then(|plan| {
                    let most = MAX_SPREAD.min(u32::try_from(available.len()).unwrap_or(u32::MAX));
                    (plan.spread + 1..=most).find(|spread| {
                        let wider = SharedPlan { spread: *spread, ..*plan };
                        wider.validate().is_ok() && {
                            let part = Room::of(&wider.share_size());
                            available.iter().any(|id| self.slot(*id).cap.fits(&part))
                        }
                    })
                })
                .map(|spread| format!("raise spread to {spread} so each share is small enough, or shrink the quota"))
                .unwrap_or_else(|| "shrink the quota or add larger shared nodes".to_string());
            return PlacementError::ShareTooLarge { tenant: tenant.to_string(), share, largest, hint };
        }
        let fitting = chosen.len()
            + available.iter().filter(|id| !chosen.contains(id) && self.free(**id, overlay).fits(need)).count();
        PlacementError::NoRoom { tenant: tenant.to_string(), needed, share, fitting }
    }
}

pub(super) fn node_id(index: usize) -> NodeId {
    // The inventory holds far fewer than 2^32 nodes; saturating keeps this total.
    NodeId::try_from(index).unwrap_or(NodeId::MAX)
}
