//! The coordinator builds each tenant node's isolation from the pods every agent reports (each
//! within its own pod range), and the agents enforce it: each tenant's IP set holds its pods
//! cluster-wide.

use std::sync::Arc;
use std::time::Duration;

use hexa_agent::isolation::firewall::{Firewall, MemoryFirewall, tenant_set_name};
use hexa_agent::pods::StaticPodSource;
use hexa_coordinator::store::Health;
use hexa_shared::report::PodInfo;
use hexa_tests::eventually;
use hexa_tests::inproc::{Coordinator, test_host};
use reqwest::Method;
use serde_json::json;

fn pod(namespace: &str, name: &str, ip: &str) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ip: Some(ip.parse().unwrap()),
        tenant: hexa_agent::pods::tenant_of(namespace),
    }
}

fn members(firewall: &MemoryFirewall, tenant: &str) -> Option<Vec<String>> {
    let rules = firewall.current().ok()?;
    rules.sets.get(&tenant_set_name(tenant)).map(|s| s.members.iter().map(|ip| ip.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_ip_sets_follow_the_pods_agents_report() {
    let c = Coordinator::start_tuned(|config| {
        config.isolation.enabled = true;
        config.isolation.management_cidrs = vec!["192.0.2.0/24".into()];
    })
    .await;
    let mut nodes = Vec::new();
    for (name, pods) in [
        ("iso-1", vec![pod("hx-acme", "acme-web-1", "10.42.1.5"), pod("kube-system", "coredns", "10.42.1.10")]),
        ("iso-2", vec![pod("hx-acme", "acme-web-2", "10.42.2.5"), pod("hx-globex", "globex-db", "10.42.2.6")]),
    ] {
        let token = c.admin.token("shared", "10m").await;
        let config = c.agent_config(name, &token);
        let firewall = Arc::new(MemoryFirewall::new());
        let source = Arc::new(StaticPodSource::new(pods));
        let host = hexa_agent::Host { firewall: firewall.clone(), pods: source.clone(), ..test_host(&config) };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(hexa_agent::run(config, host, stopped));
        nodes.push((name, firewall, source, stop, task));
    }
    eventually(Duration::from_secs(20), "nodes Ready", async || {
        let all = c.admin.nodes().await;
        (all.len() == 2 && all.iter().all(|n| n.health == Health::Ready)).then_some(())
    })
    .await;
    // acme spans both nodes; globex sits on one.
    let shared = |cpu: u64, spread: u32| json!({"kind": "shared", "cpu_millis": cpu, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": spread});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": shared(400, 2)}))).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "globex", "plan": shared(200, 1)}))).await;
    assert_eq!(status, 201, "{body}");
    let globex_node = body["placement"]["shares"][0]["node"].as_str().unwrap().to_string();

    // Every node holding acme has acme's pods from both nodes; only globex's node has globex's set.
    for (name, firewall, ..) in &nodes {
        let acme = eventually(Duration::from_secs(20), "acme's set", async || members(firewall, "acme")).await;
        assert_eq!(acme, ["10.42.1.5", "10.42.2.5"], "{name}");
        let rules = firewall.current().unwrap();
        // Without an API server, only a server node's word makes a kube-system pod a system pod:
        // this one, on a tenant node, is nobody's (tests/tests/pod_owners.rs has the server's).
        assert_eq!(rules.sets.get("hx-sys").map(|s| s.members.len()), Some(0), "{name}: no system pod");
        if *name == globex_node {
            let globex =
                eventually(Duration::from_secs(20), "globex's set", async || members(firewall, "globex")).await;
            assert_eq!(globex, ["10.42.2.6"]);
        } else {
            assert!(members(firewall, "globex").is_none(), "{name} hosts no globex share");
        }
    }

    // A new acme pod on one node reaches the other node's set.
    nodes[0].2.set(vec![
        pod("hx-acme", "acme-web-1", "10.42.1.5"),
        pod("hx-acme", "acme-web-3", "10.42.1.7"),
        pod("kube-system", "coredns", "10.42.1.10"),
    ]);
    eventually(Duration::from_secs(20), "the new pod everywhere", async || {
        nodes
            .iter()
            .all(|(_, fw, ..)| members(fw, "acme").is_some_and(|m| m == ["10.42.1.5", "10.42.1.7", "10.42.2.5"]))
            .then_some(())
    })
    .await;
    for (_, _, _, stop, task) in nodes {
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
}
