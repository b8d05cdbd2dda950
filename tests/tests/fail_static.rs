//! Fail-static: losing the coordinator never loosens isolation. An agent that starts while the
//! coordinator is unreachable enforces the last isolation it applied before any connection.

use std::sync::Arc;
use std::time::Duration;

use hexa_agent::isolation::firewall::{Firewall, SystemFirewall, tenant_set_name};
use hexa_agent::state::StateDir;
use hexa_coordinator::store::Health;
use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
use hexa_tests::eventually;
use hexa_tests::inproc::{Coordinator, test_host};
use hexa_tests::netns::{self, Topology};

/// Runs an agent called `name` until it has applied the spec the coordinator has for it, then
/// stops it; returns its configuration and the node as the inventory then saw it.
async fn run_until_applied(
    c: &Coordinator,
    name: &str,
) -> (hexa_agent::config::AgentConfig, hexa_coordinator::inventory::NodeView) {
    let agent = c.spawn_agent(name).await;
    let config = agent.config.clone();
    let applied = eventually(Duration::from_secs(20), "spec applied", async || {
        c.admin
            .node(name)
            .await
            .filter(|n| n.health == Health::Ready && n.applied_generation == Some(n.spec_generation))
    })
    .await;
    agent.stop().await;
    (config, applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_is_back_in_force_before_the_first_connection() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("skipped isolation_is_back_in_force_before_the_first_connection: {why}");
        return;
    }
    // The node's network: a namespace of its own, with the real iptables and ipset.
    let topology = Topology::builder().node("fs", "10.42.1.0/24").build().unwrap();
    let c = Coordinator::start().await;
    let (config, _) = run_until_applied(&c, "fs-node").await;

    // The last spec this node applied carried isolation (written as the agent records it).
    let state = StateDir::open(&config.state_dir).unwrap();
    let mut spec = state.load_spec().unwrap().expect("a recorded spec");
    spec.isolation = Some(IsolationSpec {
        pod_cidr: "10.42.0.0/16".parse().unwrap(),
        management_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        system_pod_ips: ["10.42.0.10".parse().unwrap()].into(),
        tenants: vec![TenantIsolation {
            tenant: "acme".into(),
            pod_ips: ["10.42.1.5".parse().unwrap(), "10.42.2.7".parse().unwrap()].into(),
        }],
        node_addresses: Default::default(),
        node_services: Vec::new(),
    });
    state.save_spec(&spec).unwrap();

    // The coordinator is gone; the agent starts again.
    let admin = c.admin.base.clone();
    c.running.shutdown().await;
    assert!(reqwest::get(format!("{admin}/healthz")).await.is_err(), "the coordinator is gone");
    let firewall = Arc::new(SystemFirewall::in_netns(topology.netns("fs")));
    let host = hexa_agent::Host { firewall: firewall.clone(), ..test_host(&config) };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));

    let rules = eventually(Duration::from_secs(10), "isolation enforced", async || {
        let current = firewall.current().ok()?;
        (!current.chains.is_empty()).then_some(current)
    })
    .await;
    let set = rules.sets.get(&tenant_set_name("acme")).expect("the tenant's set");
    assert_eq!(set.members.len(), 2, "{set:?}");
    assert!(rules.chains.keys().all(|c| c.name.starts_with("HEXA-")), "{:?}", rules.chains.keys());
    let saved = topology.exec("fs", &["iptables-save"]).unwrap();
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(
        saved.lines().any(|l| l.starts_with("-A FORWARD") && l.contains("-j HEXA-")),
        "no jump into our chains: {saved}"
    );
    assert!(!task.is_finished(), "the agent keeps trying to reach its coordinator");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_spec_file_falls_back_to_the_last_good_one_and_then_the_fresh_spec_wins() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("skipped a_corrupt_spec_file_falls_back_to_the_last_good_one_and_then_the_fresh_spec_wins: {why}");
        return;
    }
    let topology = Topology::builder().node("cs", "10.43.1.0/24").build().unwrap();
    let c = Coordinator::start().await;
    let (config, applied) = run_until_applied(&c, "cs-node").await;

    // The node last applied isolation one generation behind the coordinator's; then its
    // spec.json was damaged (the copy beside it is intact).
    let state = StateDir::open(&config.state_dir).unwrap();
    let mut spec = state.load_spec().unwrap().expect("a recorded spec");
    spec.generation = applied.spec_generation - 1;
    spec.isolation = Some(IsolationSpec {
        pod_cidr: "10.43.0.0/16".parse().unwrap(),
        management_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        system_pod_ips: Default::default(),
        tenants: vec![TenantIsolation { tenant: "acme".into(), pod_ips: ["10.43.1.5".parse().unwrap()].into() }],
        node_addresses: Default::default(),
        node_services: Vec::new(),
    });
    state.save_spec(&spec).unwrap();
    std::fs::write(config.state_dir.join("spec.json"), "{\"generation\": 3, \"trunc").unwrap();

    // The coordinator is away: the agent starts and enforces the last good isolation anyway.
    let quic_addr = c.running.quic_addr;
    c.running.shutdown().await;
    let firewall = Arc::new(SystemFirewall::in_netns(topology.netns("cs")));
    let host = hexa_agent::Host { firewall: firewall.clone(), ..test_host(&config) };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));
    let rules = eventually(Duration::from_secs(10), "the last good isolation enforced", async || {
        let current = firewall.current().ok()?;
        (!current.chains.is_empty()).then_some(current)
    })
    .await;
    assert!(rules.sets.contains_key(&tenant_set_name("acme")), "{:?}", rules.sets.keys());
    assert!(!task.is_finished(), "a damaged spec.json does not stop the agent");

    // The coordinator comes back where the agent expects it, now giving this node isolation of
    // its own (no tenants placed here): the fresh spec replaces the fallback's.
    let mut fresh = hexa_tests::inproc::fast_config(c.dir.path().join("coordinator"));
    fresh.quic_listen = quic_addr;
    fresh.isolation.enabled = true;
    let c = Coordinator::start_with(fresh, c.dir).await;
    let node = eventually(Duration::from_secs(20), "the fresh spec applied", async || {
        c.admin.node("cs-node").await.filter(|n| n.applied_generation == Some(n.spec_generation))
    })
    .await;
    assert!(node.spec_generation > applied.spec_generation, "{} {}", node.spec_generation, applied.spec_generation);
    eventually(Duration::from_secs(10), "the fresh isolation in force", async || {
        firewall
            .current()
            .ok()
            .filter(|current| !current.chains.is_empty() && !current.sets.contains_key(&tenant_set_name("acme")))
            .map(|_| ())
    })
    .await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_spec_copies_damaged_a_baseline_keeps_pods_apart_until_a_fresh_spec_comes() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset", "ping"]) {
        eprintln!("skipped with_both_spec_copies_damaged_a_baseline_keeps_pods_apart_until_a_fresh_spec_comes: {why}");
        return;
    }
    let topology = Topology::builder()
        .node("bl", "10.44.1.0/24")
        .pod("bl", "bl-p1", "10.44.1.11")
        .pod("bl", "bl-p2", "10.44.1.12")
        .build()
        .unwrap();
    let p2 = topology.pod("bl-p2").ip;
    assert!(topology.reaches("bl-p1", p2, netns::Probe::Icmp), "the pods do not reach each other to begin with");
    let c = Coordinator::start().await;
    let (mut config, applied) = run_until_applied(&c, "bl-node").await;

    // Both spec.json and the copy beside it are damaged.
    for file in ["spec.json", "spec.last-good.json"] {
        std::fs::write(config.state_dir.join(file), "{\"generation\": 3, \"trunc").unwrap();
    }
    // The node's pods, as libcni recorded them, on the topology's bridge.
    config.isolation.pod_bridge = "br0".into();
    config.isolation.baseline_pod_cidr = "10.44.0.0/16".into();
    let cni = config.state_dir.with_extension("cni");
    std::fs::create_dir_all(&cni).unwrap();
    for pod in ["bl-p1", "bl-p2"] {
        let p = topology.pod(pod);
        let json = hexa_agent::isolation::local_pods::cni_result_json("br0", &p.port, &format!("{}/24", p.ip));
        std::fs::write(cni.join(format!("cbr0-{pod}-eth0")), json).unwrap();
    }

    let quic_addr = c.running.quic_addr;
    c.running.shutdown().await;
    let firewall = Arc::new(SystemFirewall::in_netns(topology.netns("bl")));
    let host = hexa_agent::Host { firewall: firewall.clone(), ..test_host(&config) };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));
    eventually(Duration::from_secs(10), "the baseline enforced", async || {
        firewall.current().ok().filter(|current| !current.chains.is_empty()).map(|_| ())
    })
    .await;
    assert!(!topology.reaches("bl-p1", p2, netns::Probe::Icmp), "pods talk to each other under the baseline");
    assert!(!task.is_finished(), "a node without a readable spec keeps connecting");

    // The coordinator comes back: its spec (pod network 10.42.0.0/16) replaces the baseline.
    let mut fresh = hexa_tests::inproc::fast_config(c.dir.path().join("coordinator"));
    fresh.quic_listen = quic_addr;
    fresh.isolation.enabled = true;
    let c = Coordinator::start_with(fresh, c.dir).await;
    eventually(Duration::from_secs(20), "the fresh spec applied", async || {
        c.admin.node("bl-node").await.filter(|n| n.applied_generation == Some(n.spec_generation))
    })
    .await;
    eventually(Duration::from_secs(10), "the fresh isolation in force", async || {
        let save = topology.exec("bl", &["iptables-save", "-t", "mangle"]).ok()?;
        let save = String::from_utf8_lossy(&save.stdout).into_owned();
        (save.contains("10.42.0.0/16") && !save.contains("10.44.0.0/16")).then_some(())
    })
    .await;
    assert!(applied.spec_generation > 0);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
