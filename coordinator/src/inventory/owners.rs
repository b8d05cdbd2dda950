//! Where pod ownership ([`crate::pod_owners`]) meets the inventory: resolving the map when its
//! sources changed, taking the host cluster's word, persisting the nodes' pinned pod ranges.

use std::collections::BTreeMap;

use crate::pod_owners::{ApiChange, OwnerMap, PodOwners, Standing};
use crate::store::Health;

use super::{Inventory, NodeEntry, OwnerBook, POD_RANGE_PINS, lock};

impl Inventory {
    /// Resolves pod ownership again if its sources changed, adding what changed in the map to
    /// `book.pending`. True when that changed a set.
    pub(super) fn resolve_owners(&self, nodes: &BTreeMap<String, NodeEntry>, book: &mut OwnerBook) -> bool {
        if !std::mem::take(&mut book.dirty) {
            return false;
        }
        let standing: BTreeMap<String, Standing> = nodes
            .values()
            .map(|e| {
                let live = e.record.health != Health::Lost && e.record.revoked_at_unix.is_none();
                (e.record.name.clone(), Standing { pool: e.record.pool.clone(), live })
            })
            .collect();
        let map = book.sources.resolve(&standing);
        if map.conflicts() != book.map.conflicts() && !map.conflicts().is_empty() {
            let ips: Vec<String> = map.conflicts().iter().take(16).map(|ip| ip.to_string()).collect();
            tracing::warn!(
                count = map.conflicts().len(),
                ips = %ips.join(","),
                "pod IPs claimed by two owners are left out of every set until one claim goes"
            );
        }
        self.metrics.set_pod_ownership(map.conflicts().len(), map.refused());
        let changes = book.map.changes(&map);
        book.map = map;
        let changed = !changes.is_empty();
        book.pending.merge(changes);
        changed
    }

    /// Marks pod ownership as possibly changed (a node's standing changed, or its pods did).
    pub(super) fn owners_changed(&self) {
        if let Some(owners) = &self.owners {
            lock(owners).dirty = true;
            self.desired_stale.notify_one();
        }
    }

    /// From now on pod ownership comes from the host cluster's API only (see
    /// [`crate::pod_owners`]); [`Inventory::pod_owners_api`] feeds it.
    pub fn take_pod_owners_from_api(&self) {
        if let Some(owners) = &self.owners {
            lock(owners).sources.use_api();
            self.owners_changed();
        }
    }

    /// True when pod ownership is on and taken from the host cluster's API.
    pub fn pod_owners_use_api(&self) -> bool {
        self.owners.as_ref().is_some_and(|o| lock(o).sources.uses_api())
    }

    /// Takes a change the host cluster's Pod and Node watchers saw.
    pub fn pod_owners_api(&self, change: ApiChange) {
        let Some(owners) = &self.owners else { return };
        let changed = lock(owners).sources.apply_api(change);
        if changed {
            self.owners_changed();
        }
    }

    /// The pod ownership map desired state is cut from right now.
    pub fn pod_owner_map(&self) -> OwnerMap {
        self.owners.as_ref().map(|o| lock(o).map.clone()).unwrap_or_default()
    }

    /// Persists the pod ranges nodes are pinned to.
    pub(super) fn save_pins(&self, sources: &PodOwners) {
        if let Err(e) = self.store.set_meta(POD_RANGE_PINS, sources.pins()) {
            tracing::error!(error = %e, "cannot record the pod ranges nodes are pinned to");
        }
    }
}
