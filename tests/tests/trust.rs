//! Hostile peers against what a node may become: a name that is not its own, a certificate that
//! was superseded, a deleted node's certificate. Each is refused with a reason in the real
//! coordinator's log and metrics while an honest node keeps reporting.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::store::Health;
use hexa_shared::names::Pool;
use hexa_shared::proto::{CoordinatorMessage, EnrollResponse, PROTOCOL_VERSION, RefusalCode};
use hexa_tests::admin::metric;
use hexa_tests::procs::CoordinatorProc;
use hexa_tests::{eventually, free_port, inproc, raw};

use raw::refusal_of;

/// Opens a link with `creds` and waits for the welcome.
async fn welcomed_link(addr: std::net::SocketAddr, creds: &raw::NodeCreds) -> raw::RawLink {
    let mut link = raw::open_link(addr, creds.link_config()).await.expect("handshake");
    link.send(&raw::hello(&creds.name, PROTOCOL_VERSION)).await;
    match link.recv::<CoordinatorMessage>().await {
        Some(CoordinatorMessage::Welcome(_)) => link,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_cannot_be_taken_and_a_superseded_certificate_loses_its_link() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::start(dir.path(), free_port(), free_port(), "coordinator.log").await;
    let (addr, pin, admin) = (c.quic_addr, c.ca_hash, &c.admin);

    let victim = inproc::Agent::spawn(hexa_agent::config::AgentConfig {
        coordinator: addr.to_string(),
        token: admin.token("shared", "10m").await,
        ca_hash: pin.to_string(),
        state_dir: dir.path().join("victim"),
        node_name: "victim".into(),
        ephemeral_path: dir.path().to_path_buf(),
        ..Default::default()
    });
    let seen = eventually(Duration::from_secs(20), "victim Ready", async || {
        admin.node("victim").await.filter(|n| n.health == Health::Ready && n.last_report_seq.is_some())
    })
    .await;
    // The listing tells anyone with API access the victim's machine-id: it must open nothing.
    let machine_id = seen.machine_id.clone();
    assert!(!machine_id.is_empty());

    // 1. Another pool's unused token, the victim's name and machine-id.
    let (_, mut req) = raw::enroll_request(&admin.token("server", "10m").await, "victim");
    req.machine_id = machine_id.clone();
    let (code, message) = refusal_of(raw::enroll(addr, pin, &req).await);
    assert_eq!(code, RefusalCode::NameTaken, "{message}");
    assert!(message.contains("hexactl node reenroll victim"), "{message}");

    // 2. A second machine cloned from the same template (same machine-id), asking for the
    //    victim's name with a fresh token of the victim's own pool: refused too.
    let (_, mut req) = raw::enroll_request(&admin.token("shared", "10m").await, "victim");
    req.machine_id = machine_id.clone();
    let (code, _) = refusal_of(raw::enroll(addr, pin, &req).await);
    assert_eq!(code, RefusalCode::NameTaken);
    //    The clone enrolling by hostname alone gets a fresh name, and none of the victim's tenants.
    req.requested_name = None;
    req.hostname = "victim".into();
    match raw::enroll(addr, pin, &req).await {
        Ok(EnrollResponse::Accepted(e)) => assert_eq!(e.node_name, "victim-2"),
        other => panic!("{other:?}"),
    }

    // The victim is untouched: same certificate, same pool, still reporting on its link.
    eventually(Duration::from_secs(10), "victim still reporting", async || {
        admin.node("victim").await.filter(|n| {
            n.health == Health::Ready
                && n.connected
                && n.pool == Pool::Shared
                && n.enrolled_at_unix == seen.enrolled_at_unix
                && n.last_report_seq > seen.last_report_seq.map(|s| s + 3)
        })
    })
    .await;

    // 3. Re-enrollment with the one token that may do it: the old certificate's open link closes
    //    at once, and that certificate opens nothing any more.
    let first = raw::enroll_node(addr, pin, &admin.token("shared", "10m").await, "node-r").await;
    let old_link = welcomed_link(addr, &first).await;
    let (status, created) = admin.request(Method::POST, "/v1/nodes/node-r/reenroll", Some(json!({"ttl": "5m"}))).await;
    assert_eq!(status, 201, "{created}");
    let reenroll = created["token"].as_str().unwrap().to_string();
    //    The re-enrollment token is bound to its node: it cannot enroll another name.
    let (code, _) = refusal_of(raw::enroll(addr, pin, &raw::enroll_request(&reenroll, "someone-else").1).await);
    assert_eq!(code, RefusalCode::IdentityMismatch);
    let started = Instant::now();
    let second = raw::enroll_node(addr, pin, &reenroll, "node-r").await;
    assert_eq!(second.name, "node-r");
    let closed = tokio::time::timeout(Duration::from_secs(3), old_link.conn.closed()).await;
    let closed_after = started.elapsed();
    let reason = match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => String::from_utf8_lossy(&close.reason).into_owned(),
        other => panic!("the superseded certificate's link stayed open: {other:?}"),
    };
    assert!(reason.contains("superseded"), "{reason}");
    println!("superseded link closed {} ms after the re-enrollment", closed_after.as_millis());
    let reason = raw::refused_link(addr, first.link_config()).await;
    assert!(reason.contains("superseded"), "{reason}");
    let _new_link = welcomed_link(addr, &second).await;

    // Every refusal is counted and logged with its reason.
    let metrics = admin.metrics().await;
    for (reason, at_least) in
        [("nametaken", 2), ("identitymismatch", 1), ("link_closed_superseded", 1), ("certificate_superseded", 1)]
    {
        let n = metric(&metrics, &format!("hexa_refusals_total{{reason=\"{reason}\"}}"));
        assert!(n >= at_least, "{reason}: {n}\n{metrics}");
    }
    let log = c.proc.log_text();
    for needle in ["node victim is already enrolled", "re-enrolls node node-r only", "has been superseded"] {
        assert!(log.contains(needle), "coordinator log lacks {needle:?}:\n{log}");
    }
    victim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_loses_its_link_its_shares_and_its_marks() {
    let manifests = tempfile::tempdir().unwrap();
    let marks = manifests.path().to_path_buf();
    let c = inproc::Coordinator::start_tuned(|config| {
        config.hostcluster.mode = Mode::Manifests;
        config.hostcluster.manifests_dir = marks.clone();
    })
    .await;
    let mut agents = Vec::new();
    for name in ["d-1", "d-2", "d-3"] {
        agents.push(c.spawn_agent(name).await);
    }
    for name in ["d-1", "d-2", "d-3"] {
        eventually(Duration::from_secs(20), "nodes Ready", async || {
            c.admin.node(name).await.filter(|n| n.health == Health::Ready)
        })
        .await;
    }
    let plan = json!({"kind": "shared", "cpu_millis": 400, "memory_bytes": 256u64 << 20, "pods": 4, "replicas": 1, "spread": 2});
    let (status, tenant) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{tenant}");
    let holders = |tenant: &serde_json::Value| -> Vec<String> {
        tenant["placement"]["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["node"].as_str().unwrap().to_string())
            .collect()
    };
    let victim = holders(&tenant)[0].clone();
    let node_marks = marks.join(format!("nodes/{victim}.yaml"));
    eventually(Duration::from_secs(10), "the victim's marks written", async || node_marks.exists().then_some(())).await;
    let index = ["d-1", "d-2", "d-3"].iter().position(|n| *n == victim).unwrap();
    let identity = hexa_agent::state::StateDir::open(&agents[index].config.state_dir).unwrap().load_identity().unwrap();

    // As an operator does it.
    let deleted = tokio::process::Command::new(hexa_tests::bin("hexactl"))
        .args(["--server", &c.admin.base, "-o", "json", "--yes", "node", "delete", &victim])
        .env("HEXA_TOKEN", &c.admin.token)
        .output()
        .await
        .unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let last: serde_json::Value = serde_json::from_slice(&deleted.stdout).unwrap();
    assert_eq!(last["name"], victim.as_str());

    // Its link is closed with the reason and its agent stops trying: the certificate opens nothing.
    let agent = agents.remove(index);
    let ended = tokio::time::timeout(Duration::from_secs(10), agent.task).await.expect("the agent's link ends");
    let error = ended.unwrap().unwrap_err().to_string();
    assert!(error.contains("deleted") || error.contains("not enrolled"), "{error}");
    let creds = raw::NodeCreds {
        name: victim.clone(),
        key_der: identity.key_der().unwrap().secret_der().to_vec(),
        chain: identity.chain.clone(),
        ca: identity.ca.clone(),
    };
    let reason = raw::refused_link(c.running.quic_addr, creds.link_config()).await;
    assert!(reason.contains("not enrolled"), "{reason}");

    // Gone from the inventory; its share moved to the node that had none; its marks removed.
    let (status, _) = c.admin.request(Method::GET, &format!("/v1/nodes/{victim}"), None).await;
    assert_eq!(status, 404);
    let (_, nodes) = c.admin.request(Method::GET, "/v1/nodes", None).await;
    assert!(nodes.as_array().unwrap().iter().all(|n| n["name"] != victim.as_str()), "{nodes}");
    let moved = eventually(Duration::from_secs(10), "share moved", async || {
        let (_, tenant) = c.admin.request(Method::GET, "/v1/tenants/acme", None).await;
        let now = holders(&tenant);
        (now.len() == 2 && !now.contains(&victim)).then_some(now)
    })
    .await;
    eventually(Duration::from_secs(10), "marks follow the share", async || {
        (!node_marks.exists() && moved.iter().all(|n| marks.join(format!("nodes/{n}.yaml")).exists())).then_some(())
    })
    .await;
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_enrollments_starves_no_honest_agent() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::start(dir.path(), free_port(), free_port(), "coordinator.log").await;
    let (addr, pin, admin) = (c.quic_addr, c.ca_hash, &c.admin);
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(admin.token("shared", "10m").await);
    }
    let before = hexa_tests::hostile::peak_rss_mib(c.proc.pid());

    // 1,000 strangers at once, half holding a connection with a length prefix and silence, half
    // pushing 1 MiB bodies; meanwhile 20 honest agents enroll and report.
    let flood = tokio::spawn(hexa_tests::hostile::enrollment_flood(addr, pin, 1000, Duration::from_secs(30)));
    let honest: Vec<inproc::Agent> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            inproc::Agent::spawn(hexa_agent::config::AgentConfig {
                coordinator: addr.to_string(),
                token,
                ca_hash: pin.to_string(),
                state_dir: dir.path().join(format!("honest-{i}")),
                node_name: format!("honest-{i}"),
                ephemeral_path: dir.path().to_path_buf(),
                ..Default::default()
            })
        })
        .collect();
    eventually(Duration::from_secs(120), "every honest agent Ready", async || {
        let nodes = admin.nodes().await;
        let ready = nodes.iter().filter(|n| n.name.starts_with("honest-") && n.health == Health::Ready).count();
        (ready == 20).then_some(())
    })
    .await;
    let outcome = flood.await.unwrap();
    let peak = hexa_tests::hostile::peak_rss_mib(c.proc.pid());
    println!(
        "flood: {} admitted, {} refused, {} closed by the coordinator; coordinator peak RSS {before:.1} -> {peak:.1} MiB",
        outcome.admitted.load(std::sync::atomic::Ordering::Relaxed),
        outcome.refused.load(std::sync::atomic::Ordering::Relaxed),
        outcome.closed_by_coordinator.load(std::sync::atomic::Ordering::Relaxed),
    );
    // The coordinator bounded what it held and said why.
    let metrics = admin.metrics().await;
    let count = |reason: &str| metric(&metrics, &format!("hexa_refusals_total{{reason=\"{reason}\"}}"));
    assert!(count("frame_too_large") >= 1, "{metrics}");
    assert!(
        count("too_many_unauthenticated") + count("too_many_from_address") + count("retry_under_load") >= 1,
        "{metrics}"
    );
    assert!(c.proc.log_text().contains("exceeds the 16384-byte cap"), "enrollment frames are capped small");
    for agent in honest {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_on_the_admin_port_are_cut_off_and_healthz_keeps_answering() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let c = CoordinatorProc::start(dir.path(), free_port(), admin_port, "coordinator.log").await;
    let admin_addr: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let mut slow = hexa_tests::hostile::slow_header_connections(admin_addr, 300).await;
    assert_eq!(slow.len(), 300);
    let http = reqwest::Client::new();
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let response = http.get(format!("http://{admin_addr}/healthz")).send().await.expect("healthz answers");
        assert_eq!(response.status(), 200);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!("healthz beside 300 slow-header connections: p50 {:?}, max {:?}", latencies[10], latencies[19]);
    // The header deadline closes every slow connection: each read ends (EOF or reset).
    for stream in slow.iter_mut() {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncReadExt::read(stream, &mut buf)).await;
        assert!(read.is_ok(), "a slow-header connection is still held open");
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ahead_of_the_coordinator_still_gets_the_next_spec() {
    let c = inproc::Coordinator::start().await;
    let agent = c.spawn_agent("ahead").await;
    let first = eventually(Duration::from_secs(20), "spec applied", async || {
        c.admin
            .node("ahead")
            .await
            .filter(|n| n.health == Health::Ready && n.applied_generation == Some(n.spec_generation))
    })
    .await;
    assert!(first.spec_generation < 10, "{}", first.spec_generation);
    let config = agent.config.clone();
    agent.stop().await;
    // As after a restored state database: the node applied a generation the coordinator never made.
    let path = config.state_dir.join("spec.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    spec["generation"] = json!(1000);
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();

    let agent = inproc::Agent::spawn(config);
    let caught_up = eventually(Duration::from_secs(20), "the node applies a spec past 1000", async || {
        c.admin
            .node("ahead")
            .await
            .filter(|n| n.applied_generation == Some(n.spec_generation) && n.spec_generation > 1000)
    })
    .await;
    assert_eq!(caught_up.spec_generation, 1001);
    assert_eq!(caught_up.apply_error, None);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_from_a_file_stays_out_of_the_command_line() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::start(dir.path(), free_port(), free_port(), "coordinator.log").await;
    let token = c.admin.token("shared", "10m").await;
    let token_file = dir.path().join("bootstrap.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let agent = hexa_tests::procs::Proc::spawn(
        &hexa_tests::bin("hexa-agent"),
        &[
            "--coordinator".into(),
            c.quic_addr.to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--ca-hash".into(),
            c.ca_hash.to_string(),
            "--state-dir".into(),
            dir.path().join("filed").display().to_string(),
            "--node-name".into(),
            "filed".into(),
        ],
        dir.path().join("filed.log"),
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&token), "the token is visible in /proc");
    eventually(Duration::from_secs(20), "node enrolled from its token file", async || {
        c.admin.node("filed").await.filter(|n| n.health == Health::Ready)
    })
    .await;
}
