//! How silence turns into health.

use std::time::Duration;

use crate::store::Health;

/// Thresholds that turn silence into health.
#[derive(Debug, Clone, Copy)]
pub struct HealthThresholds {
    pub unreachable_after: Duration,
    pub lost_after: Duration,
    /// How long after the nodes are loaded their silence starts to count: a new leader's nodes
    /// reported to the old one until it died, and need the time to find the new one.
    pub start_grace: Duration,
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
