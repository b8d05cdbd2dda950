//! Behaviour of the placement engine: error messages, reactions, and property tests for its invariants.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use hexa_shared::report::Resources;
use hexa_shared::tenant::{DedicatedPlan, Placement, Plan, SharedPlan};

use super::{
    Decision, NodePool, NodeState, PlacementConfig, PlacementError, PlacementState, ProvisionRequest, Request, Room,
    TenantState, decide,
};

const GIB: u64 = 1 << 30;

fn node(name: &str, cpus: u64, mem_gib: u64) -> NodeState {
    NodeState {
        name: name.into(),
        pool: NodePool::Shared,
        ready: true,
        schedulable: true,
        allocatable: Resources { cpu_millis: cpus * 1000, memory_bytes: mem_gib * GIB, ephemeral_bytes: 0, pods: 110 },
        memory_available_bytes: mem_gib * GIB,
    }
}

fn dedicated_node(name: &str, class: &str, enrolled_for: Option<&str>) -> NodeState {
    NodeState {
        pool: NodePool::Dedicated { tenant: enrolled_for.map(str::to_string), node_class: Some(class.into()) },
        ..node(name, 8, 32)
    }
}

/// No overcommit and no headroom, so room is plain arithmetic.
fn plain() -> PlacementConfig {
    PlacementConfig { cpu_overcommit: 1.0, memory_overcommit: 1.0, headroom: 0.0, ..PlacementConfig::default() }
}

fn shared(cpus: u64, mem_gib: u64, replicas: u8, spread: u32) -> Plan {
    Plan::Shared(SharedPlan {
        cpu_millis: cpus * 1000,
        memory_bytes: mem_gib * GIB,
        pods: 10 * spread,
        replicas,
        spread,
    })
}

fn dedicated(class: &str, count: u32) -> Plan {
    Plan::Dedicated(DedicatedPlan { node_class: class.into(), count })
}

fn state(nodes: Vec<NodeState>) -> PlacementState {
    PlacementState::new(plain(), nodes, Vec::new()).unwrap()
}

fn place(state: &mut PlacementState, tenant: &str, plan: Plan) -> Decision {
    let decision = state.decide(&Request::Place { tenant: tenant.into(), plan }).unwrap();
    state.apply(&decision);
    decision
}

fn run(state: &mut PlacementState, request: Request) -> Decision {
    let decision = state.decide(&request).unwrap();
    state.apply(&decision);
    decision
}

fn share_nodes(state: &PlacementState, tenant: &str) -> Vec<String> {
    state.tenant(tenant).map(|t| t.placement.shares.iter().map(|s| s.node.clone()).collect()).unwrap_or_default()
}

fn cordoned(mut view: NodeState) -> NodeState {
    view.schedulable = false;
    view
}

fn not_ready(mut view: NodeState) -> NodeState {
    view.ready = false;
    view
}

#[test]
fn refusals_say_what_does_not_fit_and_what_to_change() {
    let full = |name: &str| {
        let mut s = state(vec![node("a", 4, 8), node("b", 4, 8), node("c", 4, 8)]);
        place(&mut s, "big", shared(3, 1, 1, 1));
        s.decide(&Request::Place { tenant: name.into(), plan: shared(6, 12, 1, 3) }).unwrap_err().to_string()
    };
    let fresh = |nodes: Vec<NodeState>, plan: Plan| {
        state(nodes).decide(&Request::Place { tenant: "acme".into(), plan }).unwrap_err().to_string()
    };
    let table: Vec<(String, &str)> = vec![
        (
            fresh(vec![dedicated_node("d", "M", None)], shared(1, 1, 1, 1)),
            "tenant acme needs 1 shared node and there is no Ready schedulable shared node: enroll shared nodes or uncordon one",
        ),
        (
            fresh(vec![node("a", 4, 8), node("b", 4, 8)], shared(3, 3, 3, 3)),
            "tenant acme needs 3 distinct Ready schedulable shared nodes (spread 3) and only 2 exist: lower spread to 2 or add shared nodes",
        ),
        (
            fresh(vec![node("a", 4, 8), cordoned(node("b", 4, 8)), not_ready(node("c", 4, 8))], shared(2, 2, 1, 2)),
            "and only 1 exists: lower spread to 1",
        ),
        (
            fresh(vec![node("a", 4, 8), node("b", 4, 8)], shared(8, 1, 1, 1)),
            "tenant acme: each share needs 8 CPU, 1.0 GiB memory and 10 pods, more than the largest Ready schedulable shared node can ever hold (4 CPU, 8.0 GiB memory and 110 pods after overcommit and headroom); raise spread to 2 so each share is small enough, or shrink the quota",
        ),
        (fresh(vec![node("a", 4, 8)], shared(8, 1, 1, 1)), "; shrink the quota or add larger shared nodes"),
        (
            full("acme"),
            "tenant acme needs 3 nodes with 2 CPU, 4.0 GiB memory and 10 pods free each; only 2 Ready schedulable shared nodes have that room: free capacity, lower spread or shrink the quota",
        ),
        (
            fresh(vec![node("a", 4, 8)], dedicated("XL", 1)),
            "tenant acme: unknown node class XL: known classes are S, M and L",
        ),
        (fresh(vec![node("a", 4, 8)], shared(4, 4, 3, 1)), "tenant acme: spread 1 is smaller than replicas 3"),
    ];
    for (got, expected) in table {
        assert!(got.contains(expected), "got      {got:?}\nexpected {expected:?}");
    }

    let mut s = state(vec![node("a", 4, 8)]);
    place(&mut s, "acme", shared(1, 1, 1, 1));
    let errors = [
        (
            Request::Place { tenant: "acme".into(), plan: shared(1, 1, 1, 1) },
            "tenant acme already exists: change its plan instead",
        ),
        (Request::ChangePlan { tenant: "nope".into(), plan: shared(1, 1, 1, 1) }, "tenant nope does not exist"),
        (Request::Delete { tenant: "nope".into() }, "tenant nope does not exist"),
        (Request::DrainNode { node: "zz".into() }, "node zz is not in the inventory"),
        (Request::Place { tenant: "Bad_Name".into(), plan: shared(1, 1, 1, 1) }, "tenant name \"Bad_Name\" is invalid"),
    ];
    for (request, expected) in errors {
        let got = s.decide(&request).unwrap_err().to_string();
        assert!(got.contains(expected), "{request:?}: got {got:?}");
    }
    let twice = PlacementState::new(plain(), vec![node("a", 4, 8), node("a", 4, 8)], Vec::new()).unwrap_err();
    assert_eq!(twice.to_string(), "node a is listed twice in the inventory view: each node name must be unique");
    let bad = PlacementConfig { headroom: 0.7, ..plain() };
    assert!(
        PlacementState::new(bad, Vec::new(), Vec::new())
            .unwrap_err()
            .to_string()
            .contains("headroom 0.7 is out of range")
    );
}

#[test]
fn shares_go_on_distinct_nodes_with_replicas_on_the_first_shares() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16), node("d", 8, 16)]);
    let decision = place(&mut s, "acme", shared(6, 12, 3, 3));
    let placement = &decision.tenants[0].placement;
    let nodes: BTreeSet<&str> = placement.shares.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(nodes.len(), 3);
    assert_eq!(placement.shares.iter().filter(|s| s.control_plane).count(), 3);
    assert!(placement.shares.iter().all(|s| s.size.cpu_millis == 2000 && s.size.memory_bytes == 4 * GIB));
}

#[test]
fn best_fit_fills_used_nodes_and_opens_the_largest_empty_node() {
    let mut s = state(vec![node("a", 4, 8), node("b", 16, 32), node("c", 8, 16), node("d", 16, 32)]);
    // Nothing used: the largest empty node, first by name among equals.
    place(&mut s, "t1", shared(2, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t1"), ["b"]);
    // b still has room: fill it before opening another node.
    place(&mut s, "t2", shared(2, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t2"), ["b"]);
    // Too big for what is left on b (12 CPU): opens d, the next largest.
    place(&mut s, "t3", shared(13, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t3"), ["d"]);
    // Fits on b (12 left) and d (3 left): best fit on CPU is d.
    place(&mut s, "t4", shared(3, 1, 1, 1));
    assert_eq!(share_nodes(&s, "t4"), ["d"]);
    assert_eq!(s.nodes_in_use(), 2);
}

#[test]
fn room_counts_overcommit_headroom_and_live_memory() {
    let config = PlacementConfig { cpu_overcommit: 2.0, memory_overcommit: 1.0, headroom: 0.25, ..plain() };
    let mut low_memory = node("b", 4, 8);
    low_memory.memory_available_bytes = 3 * GIB;
    let mut s = PlacementState::new(config, vec![node("a", 4, 8), low_memory], Vec::new()).unwrap();
    // a: 4 CPU x 2 - 1 = 7 CPU, 8 GiB - 2 = 6 GiB. b: same, but live memory 3 - 2 = 1 GiB.
    assert_eq!(s.free_room("a").unwrap(), Room { cpu_millis: 7000, memory_bytes: 6 * GIB, pods: 110 });
    assert_eq!(s.free_room("b").unwrap().memory_bytes, GIB);
    place(&mut s, "t1", shared(7, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t1"), ["a"]);
    let err = s.decide(&Request::Place { tenant: "t2".into(), plan: shared(1, 2, 1, 1) }).unwrap_err();
    assert!(err.to_string().contains("only 0 Ready schedulable shared nodes have that room"), "{err}");
    // A burst between reports cannot promise the same live memory twice.
    place(&mut s, "t3", shared(1, 1, 1, 1));
    assert_eq!(share_nodes(&s, "t3"), ["b"]);
    assert_eq!(s.free_room("b").unwrap().memory_bytes, 0);
    // A fresh report restores it.
    let mut report = node("b", 4, 8);
    report.memory_available_bytes = 6 * GIB;
    s.update_node(report).unwrap();
    assert_eq!(s.free_room("b").unwrap().memory_bytes, 4 * GIB);
}

#[test]
fn a_lost_node_has_its_shares_re_placed_and_the_others_stay() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16), node("d", 4, 8)]);
    place(&mut s, "acme", shared(6, 6, 3, 3));
    let before = share_nodes(&s, "acme");
    assert_eq!(before, ["a", "b", "c"]);
    let decision = run(&mut s, Request::NodeLost { node: "b".into() });
    assert!(decision.unplaced.is_empty());
    assert_eq!(share_nodes(&s, "acme"), ["a", "d", "c"]);
    let moved = &s.tenant("acme").unwrap().placement.shares[1];
    assert!(moved.control_plane, "the replica moves with its share");
    assert_eq!(s.reserved("b").unwrap(), Room::default());
}

#[test]
fn a_share_that_cannot_move_stays_and_says_why() {
    let mut s = state(vec![node("a", 4, 8), node("b", 4, 8)]);
    place(&mut s, "acme", shared(6, 4, 1, 2));
    let decision = run(&mut s, Request::NodeLost { node: "a".into() });
    assert!(decision.tenants.is_empty());
    assert_eq!(decision.unplaced.len(), 1);
    let unplaced = &decision.unplaced[0];
    assert_eq!((unplaced.tenant.as_str(), unplaced.share, unplaced.node.as_str()), ("acme", 0, "a"));
    assert!(unplaced.reason.contains("spread 2) and only 1 exists"), "{}", unplaced.reason);
    assert_eq!(share_nodes(&s, "acme"), ["a", "b"]);
}

#[test]
fn a_cordoned_node_gets_no_new_shares_but_keeps_its_own() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16)]);
    place(&mut s, "t1", shared(2, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t1"), ["a"]);
    s.update_node(cordoned(node("a", 8, 16))).unwrap();
    place(&mut s, "t2", shared(2, 2, 1, 1));
    assert_eq!(share_nodes(&s, "t2"), ["b"]);
    assert_eq!(share_nodes(&s, "t1"), ["a"]);
    // Shrinking on a cordoned node stays; growing moves.
    run(&mut s, Request::ChangePlan { tenant: "t1".into(), plan: shared(1, 1, 1, 1) });
    assert_eq!(share_nodes(&s, "t1"), ["a"]);
    run(&mut s, Request::ChangePlan { tenant: "t1".into(), plan: shared(3, 3, 1, 1) });
    assert_eq!(share_nodes(&s, "t1"), ["b"]);
}

#[test]
fn draining_empties_the_node() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16)]);
    place(&mut s, "t1", shared(2, 2, 1, 1));
    place(&mut s, "t2", shared(4, 4, 1, 2));
    place(&mut s, "t3", shared(1, 1, 1, 1));
    assert!(!s.shares_on("a").is_empty());
    s.update_node(cordoned(node("a", 8, 16))).unwrap();
    let decision = run(&mut s, Request::DrainNode { node: "a".into() });
    assert!(decision.unplaced.is_empty(), "{decision:?}");
    assert!(s.shares_on("a").is_empty());
    assert_eq!(s.reserved("a").unwrap(), Room::default());
    for tenant in ["t1", "t2", "t3"] {
        let nodes = share_nodes(&s, tenant);
        let distinct: BTreeSet<&String> = nodes.iter().collect();
        assert_eq!(distinct.len(), nodes.len(), "{tenant}: {nodes:?}");
    }
    // Draining an empty node, or a server, decides nothing.
    assert!(s.decide(&Request::DrainNode { node: "a".into() }).unwrap().is_empty());
}

#[test]
fn resizing_keeps_shares_that_fit_where_they_are() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16), node("d", 8, 16)]);
    place(&mut s, "acme", shared(4, 4, 1, 2));
    let before = share_nodes(&s, "acme");
    let table: &[(Plan, usize)] = &[
        // plan, shares still on their original nodes
        (shared(6, 6, 1, 2), 2),
        (shared(2, 2, 1, 2), 2),
        (shared(3, 3, 1, 3), 2),
        (shared(2, 2, 1, 1), 1),
    ];
    for (plan, kept) in table {
        run(&mut s, Request::ChangePlan { tenant: "acme".into(), plan: plan.clone() });
        let now = share_nodes(&s, "acme");
        assert_eq!(now.iter().filter(|n| before.contains(n)).count(), *kept, "{plan:?}: {before:?} -> {now:?}");
    }
    // Unchanged plan: nothing to do.
    let same = s.decide(&Request::ChangePlan { tenant: "acme".into(), plan: shared(2, 2, 1, 1) }).unwrap();
    assert!(same.is_empty());
}

#[test]
fn dedicated_plans_bind_free_nodes_of_the_class_and_ask_for_the_rest() {
    let nodes = vec![
        node("s1", 8, 16),
        dedicated_node("d1", "M", None),
        dedicated_node("d2", "L", None),
        dedicated_node("d3", "M", Some("other")),
        dedicated_node("d4", "M", None),
    ];
    let mut s = state(nodes);
    let decision = place(&mut s, "acme", dedicated("M", 3));
    let placement = &decision.tenants[0].placement;
    assert_eq!(placement.dedicated_nodes, ["d1", "d4"]);
    assert_eq!(placement.awaiting_nodes, 1);
    assert_eq!(decision.provision, [ProvisionRequest { tenant: "acme".into(), node_class: "M".into(), count: 1 }]);
    // Another tenant never gets acme's nodes, nor d3 which was enrolled for "other".
    let second = place(&mut s, "beta", dedicated("M", 1));
    assert_eq!(second.tenants[0].placement.dedicated_nodes, Vec::<String>::new());
    assert_eq!(second.provision[0].count, 1);
    // acme's VM registers: the reconcile binds it and asks for nothing more.
    s.update_node(dedicated_node("d5", "M", Some("acme"))).unwrap();
    let decision = run(&mut s, Request::Reconcile { tenant: "acme".into() });
    assert_eq!(decision.tenants[0].placement.dedicated_nodes, ["d1", "d4", "d5"]);
    assert_eq!(decision.tenants[0].placement.awaiting_nodes, 0);
    assert!(decision.provision.is_empty() && decision.cancel.is_empty(), "{decision:?}");
    assert_eq!(s.bound_to("d5"), Some("acme"));
    // Shrinking gives back nodes; deleting frees the rest and cancels beta's outstanding VM.
    let shrink = run(&mut s, Request::ChangePlan { tenant: "acme".into(), plan: dedicated("M", 1) });
    assert_eq!(shrink.released, ["d4", "d5"]);
    let delete = run(&mut s, Request::Delete { tenant: "beta".into() });
    assert_eq!(delete.cancel, [ProvisionRequest { tenant: "beta".into(), node_class: "M".into(), count: 1 }]);
    assert!(s.tenant("beta").is_none());
}

#[test]
fn a_lost_dedicated_node_is_replaced() {
    let mut s = state(vec![dedicated_node("d1", "S", None), dedicated_node("d2", "S", None)]);
    place(&mut s, "acme", dedicated("S", 1));
    let decision = run(&mut s, Request::NodeLost { node: "d1".into() });
    assert_eq!(decision.released, ["d1"]);
    assert_eq!(decision.tenants[0].placement.dedicated_nodes, ["d2"]);
    s.update_node(not_ready(dedicated_node("d1", "S", None))).unwrap();
    let decision = run(&mut s, Request::NodeLost { node: "d2".into() });
    assert_eq!(decision.tenants[0].placement.awaiting_nodes, 1, "no free S node left: a VM is asked for");
    assert_eq!(decision.provision[0].count, 1);
}

#[test]
fn plan_changes_move_the_tenant_both_ways_without_a_gap() {
    let mut s = state(vec![node("a", 8, 16), node("b", 8, 16), dedicated_node("d1", "M", None)]);
    place(&mut s, "acme", shared(4, 4, 1, 2));
    // To dedicated with one node short: shares stay until every node is bound.
    let decision = run(&mut s, Request::ChangePlan { tenant: "acme".into(), plan: dedicated("M", 2) });
    let placement = &decision.tenants[0].placement;
    assert_eq!((placement.dedicated_nodes.len(), placement.awaiting_nodes, placement.shares.len()), (1, 1, 2));
    s.update_node(dedicated_node("d2", "M", Some("acme"))).unwrap();
    let decision = run(&mut s, Request::Reconcile { tenant: "acme".into() });
    let placement = &decision.tenants[0].placement;
    assert_eq!((placement.dedicated_nodes.len(), placement.awaiting_nodes, placement.shares.len()), (2, 0, 0));
    assert_eq!(s.reserved("a").unwrap(), Room::default());
    // And back: shares placed, dedicated nodes released.
    let decision = run(&mut s, Request::ChangePlan { tenant: "acme".into(), plan: shared(4, 4, 1, 2) });
    assert_eq!(decision.released, ["d1", "d2"]);
    assert_eq!(decision.tenants[0].placement.shares.len(), 2);
    assert_eq!(s.bound_to("d1"), None);
}

#[test]
fn deleting_returns_all_capacity() {
    let nodes = vec![node("a", 8, 16), node("b", 8, 16), dedicated_node("d1", "M", None)];
    let mut s = state(nodes);
    let empty: Vec<Room> = ["a", "b"].iter().map(|n| s.free_room(n).unwrap()).collect();
    place(&mut s, "t1", shared(4, 4, 1, 2));
    place(&mut s, "t2", dedicated("M", 1));
    run(&mut s, Request::Delete { tenant: "t1".into() });
    let decision = run(&mut s, Request::Delete { tenant: "t2".into() });
    assert_eq!(decision.removed, ["t2"]);
    assert_eq!(decision.released, ["d1"]);
    assert_eq!(s.reserved("a").unwrap(), Room::default());
    assert_eq!(s.bound_to("d1"), None);
    assert_eq!(s.nodes_in_use(), 0);
    // Room is back for reservations (live memory waits for the next report).
    assert_eq!(s.capacity("a").unwrap().saturating_sub(&s.reserved("a").unwrap()), empty[0]);
}

#[test]
fn shares_never_go_on_dedicated_or_server_nodes() {
    let nodes = vec![
        NodeState { pool: NodePool::Server, ..node("srv", 64, 256) },
        dedicated_node("d1", "L", None),
        node("a", 2, 4),
    ];
    let s = state(nodes);
    let err = s.decide(&Request::Place { tenant: "acme".into(), plan: shared(3, 3, 1, 1) }).unwrap_err();
    assert!(matches!(err, PlacementError::ShareTooLarge { .. }), "{err}");
}

#[test]
fn a_state_built_from_stored_tenants_matches_the_incremental_one() {
    let nodes = vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16)];
    let mut s = PlacementState::new(plain(), nodes.clone(), Vec::new()).unwrap();
    place(&mut s, "t1", shared(2, 2, 1, 2));
    place(&mut s, "t2", shared(3, 3, 3, 3));
    let stored: Vec<TenantState> = s.tenants().cloned().collect();
    let rebuilt = PlacementState::new(plain(), nodes, stored).unwrap();
    for n in ["a", "b", "c"] {
        assert_eq!(rebuilt.reserved(n), s.reserved(n), "{n}");
        assert_eq!(rebuilt.shares_on(n), s.shares_on(n), "{n}");
    }
}

#[test]
fn decisions_round_trip_through_json() {
    let mut s = state(vec![node("a", 8, 16), dedicated_node("d1", "M", None)]);
    let decision = place(&mut s, "acme", dedicated("M", 2));
    let json = serde_json::to_string(&decision).unwrap();
    assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), decision);
    let request = Request::ChangePlan { tenant: "acme".into(), plan: shared(1, 1, 1, 1) };
    let json = serde_json::to_string(&request).unwrap();
    assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
}

// ----- Properties -----

#[derive(Debug, Clone)]
enum Op {
    Place(usize, Plan),
    Change(usize, Plan),
    Reconcile(usize),
    Lost(usize),
    Drain(usize),
    Delete(usize),
}

const TENANTS: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "t5"];

fn node_view() -> impl Strategy<Value = NodeState> {
    (0u8..10, 1u64..=16, 1u64..=64, 20u64..=100, any::<bool>(), any::<bool>(), 0usize..3, 0usize..=TENANTS.len())
        .prop_map(|(kind, cpus, mem_gib, live_pct, ready, schedulable, class, enrolled)| {
            let pool = match kind {
                0 => NodePool::Server,
                1..=3 => NodePool::Dedicated {
                    tenant: TENANTS.get(enrolled).map(|t| t.to_string()),
                    node_class: Some(["S", "M", "L"][class].to_string()),
                },
                _ => NodePool::Shared,
            };
            let memory = mem_gib * GIB;
            NodeState {
                name: String::new(),
                pool,
                ready: ready || kind > 5,
                schedulable: schedulable || kind > 6,
                allocatable: Resources { cpu_millis: cpus * 1000, memory_bytes: memory, ephemeral_bytes: 0, pods: 110 },
                memory_available_bytes: memory / 100 * live_pct,
            }
        })
}

fn fleet() -> impl Strategy<Value = Vec<NodeState>> {
    prop::collection::vec(node_view(), 1..16).prop_map(|mut nodes| {
        for (i, node) in nodes.iter_mut().enumerate() {
            node.name = format!("n{i:02}");
        }
        nodes
    })
}

fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        4 => (100u64..6_000, 128u64..12_288, 1u32..60, prop::sample::select(vec![1u8, 3]), 1u32..5).prop_map(
            |(cpu_millis, mem_mib, pods, replicas, spread)| Plan::Shared(SharedPlan {
                cpu_millis,
                memory_bytes: mem_mib << 20,
                pods,
                replicas,
                spread: spread.max(u32::from(replicas)),
            })
        ),
        1 => (prop::sample::select(vec!["S", "M", "L"]), 1u32..4)
            .prop_map(|(class, count)| Plan::Dedicated(DedicatedPlan { node_class: class.into(), count })),
    ]
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    let t = 0..TENANTS.len();
    prop_oneof![
        5 => (t.clone(), plan()).prop_map(|(t, p)| Op::Place(t, p)),
        2 => (t.clone(), plan()).prop_map(|(t, p)| Op::Change(t, p)),
        1 => t.clone().prop_map(Op::Reconcile),
        1 => (0..nodes).prop_map(Op::Lost),
        1 => (0..nodes).prop_map(Op::Drain),
        1 => t.prop_map(Op::Delete),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<NodeState>, Vec<Op>, PlacementConfig)> {
    let config = (1.0f64..3.0, 1.0f64..1.5, 0.0f64..0.3).prop_map(|(cpu, mem, headroom)| PlacementConfig {
        cpu_overcommit: cpu,
        memory_overcommit: mem,
        headroom,
        ..PlacementConfig::default()
    });
    (fleet(), config).prop_flat_map(|(nodes, config)| {
        let len = nodes.len();
        (Just(nodes), prop::collection::vec(op(len), 1..40), Just(config))
    })
}

fn request(op: &Op, nodes: &[NodeState]) -> Request {
    match op {
        Op::Place(t, plan) => Request::Place { tenant: TENANTS[*t].into(), plan: plan.clone() },
        Op::Change(t, plan) => Request::ChangePlan { tenant: TENANTS[*t].into(), plan: plan.clone() },
        Op::Reconcile(t) => Request::Reconcile { tenant: TENANTS[*t].into() },
        Op::Lost(n) => Request::NodeLost { node: nodes[*n].name.clone() },
        Op::Drain(n) => Request::DrainNode { node: nodes[*n].name.clone() },
        Op::Delete(t) => Request::Delete { tenant: TENANTS[*t].into() },
    }
}

/// Checks one committed decision against the state before it and the state after it.
fn check_step(before: &PlacementState, after: &PlacementState, decision: &Decision) -> Result<(), TestCaseError> {
    let mut share_holders: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
    let mut bound: BTreeMap<&str, &str> = BTreeMap::new();
    for tenant in after.tenants() {
        let placement: &Placement = &tenant.placement;
        // Replicas (and all shares) on distinct nodes.
        let nodes: BTreeSet<&str> = placement.shares.iter().map(|s| s.node.as_str()).collect();
        prop_assert_eq!(nodes.len(), placement.shares.len(), "{} has two shares on one node", tenant.name);
        if let Plan::Shared(plan) = &tenant.plan {
            prop_assert_eq!(placement.shares.len(), plan.spread as usize);
            let replicas = placement.shares.iter().filter(|s| s.control_plane).count();
            prop_assert_eq!(replicas, usize::from(plan.replicas));
        }
        for share in &placement.shares {
            share_holders.entry(share.node.clone()).or_default().push((tenant.name.clone(), share.index));
            let view = after.node(&share.node);
            // Shares only ever sit on shared nodes.
            prop_assert!(view.is_none_or(|v| v.pool == NodePool::Shared), "share of {} on {:?}", tenant.name, view);
        }
        // A dedicated node belongs to one tenant, of the right class, enrolled for it or for nobody.
        for node in &placement.dedicated_nodes {
            prop_assert!(bound.insert(node, &tenant.name).is_none(), "{} is bound to two tenants", node);
            if let Some(view) = after.node(node) {
                match (&view.pool, &tenant.plan) {
                    (NodePool::Dedicated { tenant: enrolled, node_class }, Plan::Dedicated(plan)) => {
                        prop_assert!(enrolled.as_deref().is_none_or(|t| t == tenant.name));
                        prop_assert_eq!(node_class.as_deref(), Some(plan.node_class.as_str()));
                    }
                    other => prop_assert!(false, "{} bound as dedicated: {:?}", node, other),
                }
            }
        }
    }
    for view in after.nodes() {
        let name = &view.name;
        let (Some(cap), Some(reserved)) = (after.capacity(name), after.reserved(name)) else { continue };
        // No node over capacity.
        prop_assert!(cap.fits(&reserved), "{} over capacity: {:?} > {:?}", name, reserved, cap);
        // Whatever a decision added to a node fit in the room it had, live memory included.
        let grown = reserved.saturating_sub(&before.reserved(name).unwrap_or_default());
        if !grown.is_zero() {
            let room = before.free_room(name).unwrap_or_default();
            prop_assert!(room.fits(&grown), "{} grew by {:?} with only {:?} free", name, grown, room);
        }
    }
    // New shares only on Ready, schedulable nodes.
    for tenant in &decision.tenants {
        let old = before.tenant(&tenant.name);
        for share in &tenant.placement.shares {
            let existed = old.is_some_and(|t| t.placement.shares.iter().any(|s| s.node == share.node));
            if !existed {
                let view = before.node(&share.node);
                prop_assert!(
                    view.is_some_and(|v| v.ready && v.schedulable && v.pool == NodePool::Shared),
                    "new share of {} on {:?}",
                    tenant.name,
                    view
                );
            }
        }
    }
    // The state's per-node index agrees with the tenants' placements.
    for view in after.nodes() {
        let mut expected = share_holders.remove(&view.name).unwrap_or_default();
        expected.sort();
        let got: Vec<(String, u32)> =
            after.shares_on(&view.name).into_iter().map(|(t, i)| (t.to_string(), i)).collect();
        prop_assert_eq!(got, expected, "shares on {}", view.name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any sequence of requests keeps every invariant: no node over capacity (and no growth beyond
    /// the room a node had, live memory included), shares and replicas on distinct nodes, new shares
    /// only on Ready schedulable shared nodes, dedicated nodes bound to one tenant of their class.
    #[test]
    fn invariants_hold_after_every_decision((nodes, ops, config) in scenario()) {
        let mut state = PlacementState::new(config, nodes.clone(), Vec::new()).unwrap();
        for op in &ops {
            if let Op::Drain(n) = op {
                // The admin API cordons a node before draining it.
                let mut view = state.node(&nodes[*n].name).cloned().unwrap();
                view.schedulable = false;
                state.update_node(view).unwrap();
            }
            let request = request(op, &nodes);
            let before = state.clone();
            let Ok(decision) = state.decide(&request) else { continue };
            state.apply(&decision);
            check_step(&before, &state, &decision)?;
            if let Op::Lost(n) = op {
                let mut view = state.node(&nodes[*n].name).cloned().unwrap();
                view.ready = false;
                state.update_node(view).unwrap();
            }
        }
    }

    /// The same input gives the same decision, whatever order nodes and tenants are listed in.
    #[test]
    fn same_input_same_decision((nodes, ops, config) in scenario()) {
        let mut state = PlacementState::new(config.clone(), nodes.clone(), Vec::new()).unwrap();
        for op in &ops {
            let request = request(op, &nodes);
            let tenants: Vec<TenantState> = state.tenants().cloned().collect();
            let views: Vec<NodeState> = state.nodes().cloned().collect();
            let first = decide(&config, &views, &tenants, &request);
            let again = decide(&config, &views, &tenants, &request);
            prop_assert_eq!(&first, &again);
            let mut reversed_views = views.clone();
            reversed_views.reverse();
            let mut reversed_tenants = tenants.clone();
            reversed_tenants.reverse();
            let shuffled = decide(&config, &reversed_views, &reversed_tenants, &request);
            prop_assert_eq!(&first, &shuffled);
            if let Ok(decision) = first {
                state.apply(&decision);
                // Rebuild from the stored form, as after a restart, so the next step's input is plain data.
                let tenants: Vec<TenantState> = state.tenants().cloned().collect();
                state = PlacementState::new(config.clone(), views, tenants).unwrap();
            }
        }
    }
}
