//! Processes killed with SIGKILL: nothing acknowledged is lost, and the survivors recover alone.

use std::time::{Duration, Instant};

use hexa_coordinator::store::Health;
use hexa_tests::procs::{CoordinatorProc, spawn_agent};
use hexa_tests::{eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_keeps_its_state_and_agents_return() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (quic, admin_port) = (free_port(), free_port());
    let mut c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-1.log").await;
    let ca = c.ca_hash.to_string();
    let agents = c.spawn_shared_agents(dir.path(), &["n1", "n2"]).await;
    let spare = c.admin.token("dedicated:acme", "10m").await;
    let spare_id = spare.split('.').next().unwrap().to_string();
    c.wait_ready(2).await;

    c.proc.kill9();
    let c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-2.log").await;
    assert_eq!(c.ca_hash.to_string(), ca, "the CA survives the restart");
    let restarted = Instant::now();

    // Nodes and tokens are still there, straight after the restart.
    let names: Vec<String> = c.admin.nodes().await.into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["n1", "n2"]);
    let (_, tokens) = c.admin.request(reqwest::Method::GET, "/v1/tokens", None).await;
    let tokens = tokens.as_array().cloned().unwrap_or_default();
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    let spare_view = tokens.iter().find(|t| t["id"] == spare_id.as_str()).expect("unused token listed");
    assert_eq!(spare_view["status"], "active");
    assert_eq!(spare_view["pool"], "dedicated:acme");
    assert_eq!(tokens.iter().filter(|t| t["status"] == "used").count(), 2);

    // The agents reconnect on their own within 10 s.
    eventually(Duration::from_secs(10), "agents reconnected and Ready", async || {
        let nodes = c.admin.nodes().await;
        nodes.iter().all(|n| n.health == Health::Ready && n.connected && n.last_report_seq.is_some()).then_some(())
    })
    .await;
    eprintln!("agents back {:?} after the restart", restarted.elapsed());
    for agent in &agents {
        assert!(
            agent.log_text().contains("reconnecting") || agent.log_text().contains("link lost"),
            "{}",
            agent.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_becomes_unreachable_then_lost() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    // Thresholds (fast config): Unreachable after 1s of silence, Lost after 3s.
    let (quic, admin_port) = (free_port(), free_port());
    let mut c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator.log").await;
    let token = c.admin.token("shared", "10m").await;
    let mut agent = spawn_agent(dir.path(), "victim", c.quic_addr, &token, &c.ca_hash.to_string());
    eventually(Duration::from_secs(30), "victim Ready", async || {
        c.admin.node("victim").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    agent.kill9();

    let mut seen = Vec::new();
    let lost = eventually(Duration::from_secs(20), "victim Lost", async || {
        let node = c.admin.node("victim").await?;
        if seen.last() != Some(&node.health) {
            seen.push(node.health);
            // Health follows silence since the last report: Unreachable not before 1s, Lost not before 3s.
            let silent = Duration::from_millis(node.last_report_age_ms.unwrap_or_default());
            match node.health {
                Health::Unreachable => assert!(silent >= Duration::from_secs(1), "Unreachable after {silent:?}"),
                Health::Lost => assert!(silent >= Duration::from_secs(3), "Lost after {silent:?}"),
                _ => {}
            }
        }
        (node.health == Health::Lost).then_some(node)
    })
    .await;
    assert_eq!(seen.iter().filter(|h| **h != Health::Ready).collect::<Vec<_>>(), [&Health::Unreachable, &Health::Lost]);
    assert!(!lost.connected);
    let log = c.proc.log_text();
    assert!(log.contains("from=Ready to=Unreachable") && log.contains("from=Unreachable to=Lost"), "{log}");

    // Lost is persisted: it survives a coordinator restart instead of resetting to Pending.
    c.proc.kill9();
    let c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-2.log").await;
    assert_eq!(c.admin.node("victim").await.map(|n| n.health), Some(Health::Lost));
}
