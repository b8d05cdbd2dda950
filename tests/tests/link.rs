//! Enrollment and the node link over real QUIC on loopback.

use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::proto::{AgentMessage, CoordinatorMessage, EnrollResponse, PROTOCOL_VERSION, RefusalCode};
use hexa_shared::report::{CapacityReport, Resources};
use hexa_tests::inproc::Coordinator;
use hexa_tests::{eventually, raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolls_and_its_reports_show_in_the_inventory() {
    let coordinator = Coordinator::start().await;
    let agent = coordinator.spawn_agent("worker-1").await;
    let interval_ms = hexa_tests::inproc::fast_config(Default::default()).report_interval.as_millis() as u64;
    let node = eventually(Duration::from_secs(20), "worker-1 Ready with figures", async || {
        coordinator.admin.node("worker-1").await.filter(|n| n.health == Health::Ready && n.capacity.is_some())
    })
    .await;
    let capacity = node.capacity.unwrap_or_default();
    let usage = node.usage.unwrap_or_default();
    assert!(capacity.cpu_millis >= 1000, "{capacity:?}");
    assert!(capacity.memory_bytes > 0 && usage.memory_available_bytes <= capacity.memory_bytes);
    assert!(capacity.ephemeral_bytes > 0 && capacity.pods == 110);
    assert!(node.allocatable.unwrap_or_default().memory_bytes < capacity.memory_bytes, "reservations are subtracted");
    // What the API shows is the latest report: never older than one interval plus delivery.
    assert!(node.last_report_age_ms.unwrap_or(u64::MAX) <= interval_ms * 2, "{:?}", node.last_report_age_ms);
    assert!(node.connected);
    assert_eq!(node.pool.to_string(), "shared");
    // The first spec (pool labels) reached the agent and was applied.
    let node = eventually(Duration::from_secs(10), "spec applied", async || {
        coordinator.admin.node("worker-1").await.filter(|n| n.applied_generation == Some(n.spec_generation))
    })
    .await;
    assert_eq!(node.spec_generation, 1);
    // Reports keep flowing.
    let seq = node.last_report_seq.unwrap_or_default();
    eventually(Duration::from_secs(10), "more reports", async || {
        coordinator.admin.node("worker-1").await.filter(|n| n.last_report_seq > Some(seq + 2))
    })
    .await;
    // The key was generated on the node and is private.
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.config.state_dir.join("node.key")).unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    agent.stop().await;
}

fn report(seq: u64, claimed: &str, cpu_millis: u64) -> AgentMessage {
    AgentMessage::Report(Box::new(CapacityReport {
        seq,
        node_name: claimed.into(),
        collected_at_unix_ms: 0,
        capacity: Resources { cpu_millis, memory_bytes: 1, ephemeral_bytes: 1, pods: 1 },
        allocatable: Resources::default(),
        usage: Default::default(),
        cgroup_limits: Default::default(),
        applied_generation: 0,
        k3s: Default::default(),
        pods: Vec::new(),
        tenant_usage: Vec::new(),
        firewall_displacements: 0,
        isolation: Default::default(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_certificate_not_the_message() {
    let coordinator = Coordinator::start().await;
    let addr = coordinator.running.quic_addr;
    let pin = coordinator.running.ca_hash;
    let a = raw::enroll_node(addr, pin, &coordinator.admin.token("shared", "5m").await, "node-a").await;
    let b = raw::enroll_node(addr, pin, &coordinator.admin.token("shared", "5m").await, "node-b").await;

    // node-b reports honestly.
    let mut link_b = raw::open_link(addr, b.link_config()).await.expect("b connects");
    link_b.send(&raw::hello("node-b", PROTOCOL_VERSION)).await;
    assert!(matches!(link_b.recv::<CoordinatorMessage>().await, Some(CoordinatorMessage::Welcome(_))));
    link_b.send(&report(1, "node-b", 2000)).await;

    // node-a claims to be node-b in its hello and in its report.
    let mut link_a = raw::open_link(addr, a.link_config()).await.expect("a connects");
    link_a.send(&raw::hello("node-b", PROTOCOL_VERSION)).await;
    match link_a.recv::<CoordinatorMessage>().await {
        Some(CoordinatorMessage::Welcome(w)) => {
            assert_eq!(w.node_name, "node-a", "the welcome names the certificate's node")
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    link_a.send(&report(1, "node-b", 99_000)).await;

    let a_view = eventually(Duration::from_secs(10), "node-a's report", async || {
        coordinator.admin.node("node-a").await.filter(|n| n.capacity.is_some())
    })
    .await;
    assert_eq!(a_view.capacity.map(|c| c.cpu_millis), Some(99_000), "the report is recorded for node-a");
    let b_view = coordinator.admin.node("node-b").await.expect("node-b listed");
    assert_eq!(b_view.capacity.map(|c| c.cpu_millis), Some(2000), "node-b is untouched by node-a's claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_superseded_by_re_enrollment_is_refused() {
    let coordinator = Coordinator::start().await;
    let addr = coordinator.running.quic_addr;
    let pin = coordinator.running.ca_hash;
    let first = raw::enroll_node(addr, pin, &coordinator.admin.token("shared", "5m").await, "node-r").await;
    // The same machine enrolls again (re-imaged) with the token minted to re-enroll it: it keeps its
    // name, and the old certificate dies.
    let (status, reenroll) = coordinator
        .admin
        .request(reqwest::Method::POST, "/v1/nodes/node-r/reenroll", Some(serde_json::json!({})))
        .await;
    assert_eq!(status, 201, "{reenroll}");
    let second = raw::enroll_node(addr, pin, reenroll["token"].as_str().unwrap(), "node-r").await;
    assert_eq!(second.name, "node-r");
    let reason = raw::refused_link(addr, first.link_config()).await;
    assert!(reason.contains("superseded"), "{reason}");
    let mut new = raw::open_link(addr, second.link_config()).await.expect("handshake");
    new.send(&raw::hello("node-r", PROTOCOL_VERSION)).await;
    assert!(matches!(new.recv::<CoordinatorMessage>().await, Some(CoordinatorMessage::Welcome(_))));
    // Another machine asking for the same name gets a distinct one.
    let (_, mut req) = raw::enroll_request(&coordinator.admin.token("shared", "5m").await, "node-r");
    req.machine_id = "another-machine".into();
    match raw::enroll(addr, pin, &req).await {
        Ok(EnrollResponse::Accepted(e)) => assert_eq!(e.node_name, "node-r-2"),
        other => panic!("{other:?}"),
    }
    // A requested name that is not a DNS label is refused with the rule it breaks.
    let (_, mut req) = raw::enroll_request(&coordinator.admin.token("shared", "5m").await, "x");
    req.requested_name = Some("Bad_Name".into());
    match raw::enroll(addr, pin, &req).await {
        Ok(EnrollResponse::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::MalformedRequest);
            assert!(r.message.contains("lowercase"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}
