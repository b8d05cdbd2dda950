//! Baseline node choices the benchmark compares ours with: first fit (first-fit-decreasing when the
//! tenants come largest first) and Kubernetes' NodeResourcesFit scoring strategies.
//!
//! First fit tries nodes largest first (usable memory, then CPU, then name), the strong variant for
//! a fleet of mixed node sizes: in name order it opens small nodes as readily as large ones.
//!
//! kube-scheduler scores each feasible node 0..=100 per resource and averages with the resource
//! weights (cpu and memory, weight 1 each, by default), with `requested` including the pod being
//! scheduled and integer arithmetic throughout:
//! - `LeastAllocated`: `(capacity - requested) * 100 / capacity` (0 when over capacity);
//! - `MostAllocated`: `min(requested, capacity) * 100 / capacity`.
//!
//! The highest score wins; kube-scheduler breaks ties at random, these break them by node name so
//! runs are reproducible. They score every feasible node (kube-scheduler's
//! `percentageOfNodesToScore` sampling is not modelled), against the same room and the same rules
//! (overcommit, headroom, live memory, distinct nodes) as ours.

use std::cmp::Reverse;

use super::Strategy;
use super::room::Room;
use super::state::{NodeId, Overlay, PlacementState, node_id};

const MAX_NODE_SCORE: u64 = 100;

pub(super) fn choose(
    state: &PlacementState,
    strategy: Strategy,
    need: &Room,
    exclude: &[NodeId],
    overlay: &Overlay,
) -> Option<NodeId> {
    let fits = |id: &NodeId| state.takes_shares(*id) && !exclude.contains(id) && state.free(*id, overlay).fits(need);
    if matches!(strategy, Strategy::FirstFit | Strategy::DominantBestFit) {
        return state.largest_first.iter().copied().find(fits);
    }
    let mut feasible = (0..state.nodes.len()).map(node_id).filter(fits);
    let requested = |id: NodeId| state.reserved_with(id, overlay).saturating_add(need);
    match strategy {
        Strategy::FirstFit | Strategy::DominantBestFit => feasible.next(),
        Strategy::LeastAllocated => {
            feasible.max_by_key(|id| (least_allocated_score(&state.slot(*id).cap, &requested(*id)), Reverse(*id)))
        }
        Strategy::MostAllocated => {
            feasible.max_by_key(|id| (most_allocated_score(&state.slot(*id).cap, &requested(*id)), Reverse(*id)))
        }
    }
}

/// kube-scheduler's `leastRequestedScore`, averaged over CPU and memory with weight 1 each.
pub fn least_allocated_score(capacity: &Room, requested: &Room) -> u64 {
    let score = |requested: u64, capacity: u64| {
        if capacity == 0 || requested > capacity { 0 } else { (capacity - requested) * MAX_NODE_SCORE / capacity }
    };
    (score(requested.cpu_millis, capacity.cpu_millis) + score(requested.memory_bytes, capacity.memory_bytes)) / 2
}

/// kube-scheduler's `mostRequestedScore`, averaged over CPU and memory with weight 1 each.
pub fn most_allocated_score(capacity: &Room, requested: &Room) -> u64 {
    let score =
        |requested: u64, capacity: u64| (requested.min(capacity) * MAX_NODE_SCORE).checked_div(capacity).unwrap_or(0);
    (score(requested.cpu_millis, capacity.cpu_millis) + score(requested.memory_bytes, capacity.memory_bytes)) / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{NodePool, NodeState, PlacementConfig, PlacementState, Request, TenantState};
    use hexa_shared::report::Resources;
    use hexa_shared::tenant::{Placement, Plan, Share, ShareSize, SharedPlan};

    const GIB: u64 = 1 << 30;

    #[test]
    fn each_strategy_picks_the_node_its_rule_names() {
        let node = |name: &str, cpus: u64| NodeState {
            name: name.into(),
            pool: NodePool::Shared,
            ready: true,
            schedulable: true,
            allocatable: Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: cpus * 2 * GIB,
                ephemeral_bytes: 0,
                pods: 110,
            },
            memory_available_bytes: cpus * 2 * GIB,
        };
        let holding = |tenant: &str, node: &str, cpus: u64| {
            let size = ShareSize { cpu_millis: cpus * 1000, memory_bytes: cpus * GIB, pods: 1 };
            TenantState {
                name: tenant.into(),
                plan: Plan::Shared(SharedPlan {
                    cpu_millis: size.cpu_millis,
                    memory_bytes: size.memory_bytes,
                    pods: 1,
                    replicas: 1,
                    spread: 1,
                }),
                placement: Placement {
                    shares: vec![Share { index: 0, node: node.into(), size, control_plane: true }],
                    ..Placement::default()
                },
            }
        };
        // a: 8 CPU, 6 held; b: 16 CPU, empty; c: 8 CPU, 2 held.
        let nodes = vec![node("a", 8), node("b", 16), node("c", 8)];
        let tenants = vec![holding("x", "a", 6), holding("y", "c", 2)];
        let plan = Plan::Shared(SharedPlan { cpu_millis: 1000, memory_bytes: GIB, pods: 1, replicas: 1, spread: 1 });
        let table = [
            (Strategy::DominantBestFit, "a"),
            (Strategy::FirstFit, "b"),
            (Strategy::LeastAllocated, "b"),
            (Strategy::MostAllocated, "a"),
        ];
        for (strategy, expected) in table {
            let config = PlacementConfig {
                cpu_overcommit: 1.0,
                memory_overcommit: 1.0,
                headroom: 0.0,
                strategy,
                ..Default::default()
            };
            let state = PlacementState::new(config, nodes.clone(), tenants.clone()).unwrap();
            let decision = state.decide(&Request::Place { tenant: "new".into(), plan: plan.clone() }).unwrap();
            assert_eq!(decision.tenants[0].placement.shares[0].node, expected, "{strategy:?}");
        }
    }

    #[test]
    fn scores_follow_kube_scheduler() {
        let capacity = Room { cpu_millis: 4000, memory_bytes: 8 * GIB, pods: 110 };
        let table: &[(Room, u64, u64)] = &[
            // requested, least, most
            (Room { cpu_millis: 0, memory_bytes: 0, pods: 0 }, 100, 0),
            (Room { cpu_millis: 1000, memory_bytes: 4 * GIB, pods: 1 }, (75 + 50) / 2, (25 + 50) / 2),
            (Room { cpu_millis: 4000, memory_bytes: 8 * GIB, pods: 1 }, 0, 100),
            (Room { cpu_millis: 5000, memory_bytes: 2 * GIB, pods: 1 }, 75 / 2, (100 + 25) / 2),
        ];
        for (requested, least, most) in table {
            assert_eq!(least_allocated_score(&capacity, requested), *least, "{requested:?}");
            assert_eq!(most_allocated_score(&capacity, requested), *most, "{requested:?}");
        }
        assert_eq!(least_allocated_score(&Room::default(), &Room::default()), 0);
        assert_eq!(most_allocated_score(&Room::default(), &Room::default()), 0);
    }
}
