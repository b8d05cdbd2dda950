//! The simulated fleet against a real coordinator: fifty agents, each enrolled with a token of its
//! own, reporting, acknowledging specs, killed, revived and partitioned, as the inventory sees them.

use std::collections::BTreeMap;
use std::time::Duration;

use hexa_coordinator::inventory::NodeView;
use hexa_coordinator::store::Health;
use hexa_tests::eventually;
use hexa_tests::inproc::Coordinator;
use hexa_tests::sim::{Fleet, FleetConfig, Partition};

const AGENTS: usize = 50;
const WITHIN: Duration = Duration::from_secs(90);

async fn nodes(coordinator: &Coordinator) -> BTreeMap<String, NodeView> {
    coordinator.admin.nodes().await.into_iter().map(|n| (n.name.clone(), n)).collect()
}

/// Waits until every node in `names` has `health`.
async fn wait_health(coordinator: &Coordinator, names: &[String], health: Health, what: &str) {
    eventually(WITHIN, what, async || {
        let nodes = nodes(coordinator).await;
        names.iter().all(|name| nodes.get(name).is_some_and(|n| n.health == health)).then_some(())
    })
    .await;
}

/// Waits until node `name` has reported past `seq`.
async fn wait_reports_past(coordinator: &Coordinator, name: &str, seq: u64) {
    eventually(WITHIN, &format!("{name} reporting past seq {seq}"), async || {
        coordinator.admin.node(name).await.filter(|n| n.last_report_seq.is_some_and(|s| s > seq)).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_enrolls_reports_applies_and_goes_away_and_back() {
    // Lost only after a minute, so that the states this test waits for hold still.
    let coordinator = Coordinator::start_tuned(|c| c.lost_after = Duration::from_secs(60)).await;
    let mut tokens = Vec::new();
    for _ in 0..AGENTS {
        tokens.push(coordinator.admin.token("shared", "10m").await);
    }
    let config =
        FleetConfig { endpoints: 10, ..FleetConfig::new(coordinator.running.quic_addr, coordinator.running.ca_hash) };
    let mut fleet = Fleet::new(&config).unwrap();
    fleet.enroll(tokens.clone(), 16).await.unwrap();
    assert_eq!(fleet.len(), AGENTS);
    let names = fleet.names();
    assert_eq!(names[7], "sim-00007", "the coordinator grants the requested names");

    // Tokens are single use: every agent used its own, and none is left to enroll with again.
    let mut spare = Fleet::new(&FleetConfig { prefix: "again".into(), ..config.clone() }).unwrap();
    let refused = spare.enroll(vec![tokens[0].clone()], 1).await.unwrap_err().to_string();
    assert!(refused.contains("TokenUsed"), "{refused}");

    fleet.start_all();
    wait_health(&coordinator, &names, Health::Ready, "every simulated node Ready").await;

    // Every node got its spec and said it applied it; the inventory shows it applied.
    eventually(WITHIN, "every node's spec applied", async || {
        let nodes = nodes(&coordinator).await;
        names
            .iter()
            .all(|name| {
                nodes
                    .get(name)
                    .is_some_and(|n| n.spec_generation >= 1 && n.applied_generation == Some(n.spec_generation))
            })
            .then_some(())
    })
    .await;
    let view = nodes(&coordinator).await;
    for (i, name) in names.iter().enumerate() {
        assert_eq!(fleet.applied_generation(i), view[name].spec_generation, "{name}");
        assert!(view[name].connected, "{name}");
        let pods = view[name].tenant_usage.iter().map(|t| t.pods).sum::<u32>();
        assert_eq!(pods, 8, "{name} reports its pods");
    }
    assert!(fleet.stats().reports_acked.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_eq!(fleet.linked_count(), AGENTS);

    // A killed agent goes Unreachable; revived, it links again and reports.
    fleet.kill(3);
    // As with a process killed, nothing tells the coordinator: its link stays up until the
    // silence ends it (after `unreachable_after`, 1 s here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(nodes(&coordinator).await[&names[3]].connected, "the coordinator learnt of the kill from the wire");
    wait_health(&coordinator, &names[3..4], Health::Unreachable, "the killed node Unreachable").await;
    assert!(!fleet.is_linked(3));
    fleet.revive(3);
    wait_health(&coordinator, &names[3..4], Health::Ready, "the revived node Ready").await;
    wait_reports_past(&coordinator, &names[3], 0).await;
    eventually(WITHIN, "the revived agent linked", async || fleet.is_linked(3).then_some(())).await;

    // An agent that can no longer send stops reporting: Unreachable; healed, it comes back.
    fleet.partition(5, Partition::StopSending);
    wait_health(&coordinator, &names[5..6], Health::Unreachable, "the silent node Unreachable").await;
    assert!(fleet.is_linked(5) || fleet.refusal(5).is_none(), "a partition is no refusal");
    fleet.heal(5);
    wait_health(&coordinator, &names[5..6], Health::Ready, "the healed node Ready").await;

    // Dropped packets cut every agent behind the same endpoint; the rest of the fleet reports on.
    let cut: Vec<usize> = fleet.behind_same_endpoint(7);
    assert_eq!(cut.len(), AGENTS / 10);
    let cut_names: Vec<String> = cut.iter().map(|&i| names[i].clone()).collect();
    fleet.partition(7, Partition::DropPackets);
    wait_health(&coordinator, &cut_names, Health::Unreachable, "the nodes behind the cut endpoint Unreachable").await;
    let others: Vec<String> = (0..AGENTS).filter(|i| !cut.contains(i)).map(|i| names[i].clone()).collect();
    wait_health(&coordinator, &others, Health::Ready, "the rest of the fleet Ready").await;
    fleet.heal(7);
    wait_health(&coordinator, &names, Health::Ready, "the whole fleet Ready again").await;
    eventually(WITHIN, "every agent linked again", async || (fleet.linked_count() == AGENTS).then_some(())).await;

    fleet.shutdown().await;
    coordinator.running.shutdown().await;
}
