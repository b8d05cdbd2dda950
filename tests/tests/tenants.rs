//! Tenant placement through the admin API, with real agents reporting real capacity on loopback.

use std::collections::BTreeMap;
use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::tenant::{Phase, Tenant};
use hexa_tests::admin::AdminClient;
use hexa_tests::inproc::{Agent, Coordinator};
use hexa_tests::{eventually, free_port, procs::CoordinatorProc};
use reqwest::Method;
use serde_json::{Value, json};

fn shared(cpu_millis: u64, memory_gib: u64, spread: u32) -> Value {
    json!({"kind": "shared", "cpu_millis": cpu_millis, "memory_bytes": memory_gib << 30, "pods": 20, "replicas": 1, "spread": spread})
}

async fn create(admin: &AdminClient, name: &str, plan: Value) -> (u16, Value) {
    admin.request(Method::POST, "/v1/tenants", Some(json!({"name": name, "plan": plan}))).await
}

async fn tenant(admin: &AdminClient, name: &str) -> Tenant {
    let (status, body) = admin.request(Method::GET, &format!("/v1/tenants/{name}"), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

fn nodes_of(t: &Tenant) -> Vec<String> {
    t.placement.shares.iter().map(|s| s.node.clone()).collect()
}

/// A coordinator with `n` agents, all Ready with a report in.
async fn fleet(n: usize) -> (Coordinator, Vec<Agent>) {
    let c = Coordinator::start().await;
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(c.spawn_agent(&format!("node-{i}")).await);
    }
    eventually(Duration::from_secs(30), "every node Ready", async || {
        let nodes = c.admin.nodes().await;
        (nodes.len() == n && nodes.iter().all(|n| n.health == Health::Ready && n.allocatable.is_some())).then_some(())
    })
    .await;
    (c, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_fill_the_fleet_then_get_a_reason_and_deleting_returns_capacity() {
    let (c, agents) = fleet(3).await;
    let mut created = Vec::new();
    let refusal = loop {
        let name = format!("t{}", created.len());
        let (status, body) = create(&c.admin, &name, shared(1000, 1, 1)).await;
        match status {
            201 => {
                let t: Tenant = serde_json::from_value(body).unwrap();
                assert_eq!(t.phase, Phase::Deploying);
                assert_eq!(t.placement.shares.len(), 1);
                created.push(t);
            }
            _ => break (status, body),
        }
        assert!(created.len() < 50, "the fleet never filled up");
    };
    assert!(created.len() >= 3, "three nodes hold at least one 1-CPU tenant each");
    assert_eq!(refusal.0, 409, "{}", refusal.1);
    assert_eq!(refusal.1["error"]["code"], "insufficient_capacity");
    let message = refusal.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("free capacity, lower spread or shrink the quota"), "{message}");

    // Every node's desired state lists exactly the tenants placed on it, and was applied.
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &created {
        expected.entry(t.placement.shares[0].node.clone()).or_default().push(t.name.clone());
    }
    eventually(Duration::from_secs(10), "specs applied", async || {
        let nodes = c.admin.nodes().await;
        nodes.iter().all(|n| n.applied_generation == Some(n.spec_generation)).then_some(())
    })
    .await;
    for node in c.admin.nodes().await {
        let mut on_node: Vec<String> = node.tenants.iter().map(|a| a.tenant.clone()).collect();
        on_node.sort();
        let mut want = expected.get(&node.name).cloned().unwrap_or_default();
        want.sort();
        assert_eq!(on_node, want, "{}", node.name);
    }

    // Bad requests say what to change.
    let (status, body) = create(&c.admin, "t0", shared(100, 1, 1)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    let (status, body) = create(&c.admin, "Bad_Name", shared(100, 1, 1)).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = create(&c.admin, "huge", shared(64_000, 1, 1)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("unplaceable")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("shrink the quota"), "{body}");
    let (status, body) = create(&c.admin, "ded", json!({"kind": "dedicated", "node_class": "XL", "count": 1})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("known classes are S, M"), "{body}");
    let (status, body) = create(&c.admin, "wide", shared(400, 1, 4)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("lower spread to 3"), "{body}");

    // Deleting gives the capacity back: a tenant of the same size fits again.
    let (status, _) = c.admin.request(Method::DELETE, &format!("/v1/tenants/{}", created[0].name), None).await;
    assert_eq!(status, 200);
    let (status, body) = create(&c.admin, "again", shared(1000, 1, 1)).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = c.admin.request(Method::GET, &format!("/v1/tenants/{}", created[0].name), None).await;
    assert_eq!(status, 404);
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_leave_a_lost_node_and_a_drained_node_and_generations_only_move_on_change() {
    let (c, mut agents) = fleet(3).await;
    let (status, body) = create(&c.admin, "acme", shared(1000, 2, 2)).await;
    assert_eq!(status, 201, "{body}");
    let before: Tenant = serde_json::from_value(body).unwrap();
    let on = nodes_of(&before);
    let idle = ["node-1", "node-2", "node-3"].into_iter().find(|n| !on.contains(&n.to_string())).unwrap();

    // Generations: nodes that got a share moved on, the idle one did not, and nothing moves while
    // nothing changes (the control loop runs every interval).
    eventually(Duration::from_secs(10), "specs applied", async || {
        c.admin.nodes().await.iter().all(|n| n.applied_generation == Some(n.spec_generation)).then_some(())
    })
    .await;
    let generations: BTreeMap<String, u64> =
        c.admin.nodes().await.into_iter().map(|n| (n.name, n.spec_generation)).collect();
    assert_eq!(generations[idle], 1, "{generations:?}");
    assert!(on.iter().all(|n| generations[n] == 2), "{generations:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later: BTreeMap<String, u64> = c.admin.nodes().await.into_iter().map(|n| (n.name, n.spec_generation)).collect();
    assert_eq!(generations, later);

    // Drain one of acme's nodes: its share moves to the idle node and the drained node is empty.
    let drained = on[0].clone();
    let (status, body) = c.admin.request(Method::POST, &format!("/v1/nodes/{drained}/drain"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cordoned"], true);
    assert_eq!(body["tenants"], json!([]), "the drained node holds nothing");
    let acme = tenant(&c.admin, "acme").await;
    assert_eq!(acme.phase, Phase::Deploying);
    assert!(nodes_of(&acme).contains(&idle.to_string()) && nodes_of(&acme).contains(&on[1]), "{:?}", nodes_of(&acme));
    // Cordoned: no new shares. A tenant that needs three nodes no longer fits.
    let (status, body) = create(&c.admin, "wide", shared(300, 1, 3)).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = c.admin.request(Method::POST, &format!("/v1/nodes/{drained}/uncordon"), None).await;
    assert_eq!(status, 200);

    // The agent of one of acme's nodes dies: once its node is Lost, its share moves to the free node.
    let victim = on[1].clone();
    let index = agents.iter().position(|a| a.config.node_name == victim).unwrap();
    agents.remove(index).stop().await;
    let moved = eventually(Duration::from_secs(20), "acme's share off the lost node", async || {
        let t = tenant(&c.admin, "acme").await;
        (!nodes_of(&t).contains(&victim)).then_some(t)
    })
    .await;
    assert_eq!(c.admin.node(&victim).await.unwrap().health, Health::Lost, "moved only once Lost");
    assert!(nodes_of(&moved).contains(&drained), "{:?}", nodes_of(&moved));
    assert!(nodes_of(&moved).contains(&idle.to_string()), "the other share stayed put");
    assert_eq!(moved.phase, Phase::Deploying);
    let view = c.admin.node(&drained).await.unwrap();
    assert_eq!(view.tenants.iter().map(|a| a.tenant.as_str()).collect::<Vec<_>>(), ["acme"]);

    // With one node lost and one cordoned, a spread of 2 has nowhere to go.
    let (status, _) = c.admin.request(Method::POST, &format!("/v1/nodes/{drained}/cordon"), None).await;
    assert_eq!(status, 200);
    let (status, body) = create(&c.admin, "later", shared(200, 1, 2)).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = c.admin.request(Method::POST, &format!("/v1/nodes/{drained}/uncordon"), None).await;
    assert_eq!(status, 200);
    let (status, body) = create(&c.admin, "later", shared(200, 1, 2)).await;
    assert_eq!(status, 201, "{body}");
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_moves_between_shared_and_dedicated_without_being_deleted() {
    let (c, agents) = fleet(2).await;
    let (status, body) = create(&c.admin, "mover", shared(500, 1, 2)).await;
    assert_eq!(status, 201, "{body}");

    // Shared -> dedicated: no dedicated node yet, so it is Provisioning, keeps its shares meanwhile,
    // and the request is recorded.
    let (status, body) = c
        .admin
        .request(
            Method::PATCH,
            "/v1/tenants/mover",
            Some(json!({"plan": {"kind": "dedicated", "node_class": "S", "count": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let t: Tenant = serde_json::from_value(body).unwrap();
    assert_eq!(t.phase, Phase::Provisioning);
    assert_eq!(t.placement.shares.len(), 2, "no gap: the shares stay until the dedicated node is there");
    let (_, provisioning) = c.admin.request(Method::GET, "/v1/provisioning", None).await;
    assert_eq!(provisioning, json!([{"tenant": "mover", "node_class": "S", "count": 1}]));

    // The dedicated node registers: it is bound, the shares go, the request is done.
    let (status, body) = c
        .admin
        .request(Method::POST, "/v1/tokens", Some(json!({"pool": "dedicated:mover", "node_class": "S", "ttl": "10m"})))
        .await;
    assert_eq!(status, 201, "{body}");
    let dedicated = Agent::spawn(c.agent_config("mover-vm", body["token"].as_str().unwrap()));
    let bound = eventually(Duration::from_secs(20), "dedicated node bound", async || {
        let t = tenant(&c.admin, "mover").await;
        (t.phase == Phase::Deploying).then_some(t)
    })
    .await;
    assert_eq!(bound.placement.dedicated_nodes, ["mover-vm"]);
    assert!(bound.placement.shares.is_empty());
    let (_, provisioning) = c.admin.request(Method::GET, "/v1/provisioning", None).await;
    assert_eq!(provisioning, json!([]));
    // The wait from the plan change to the bound node is one dedicated placement's latency.
    let metrics = c.admin.metrics().await;
    let waited = hexa_tests::admin::metric(&metrics, "hexa_placement_seconds_count{plan=\"dedicated\"}");
    assert_eq!(waited, 1, "{metrics}");
    assert!(hexa_tests::admin::metric(&metrics, "hexa_placements_total{plan=\"dedicated\"}") >= 1, "{metrics}");
    let shared_before = hexa_tests::admin::metric(&metrics, "hexa_placement_seconds_count{plan=\"shared\"}");
    assert_eq!(shared_before, 1, "the create: {metrics}");
    let vm = c.admin.node("mover-vm").await.unwrap();
    assert_eq!(vm.tenants.iter().map(|a| a.tenant.as_str()).collect::<Vec<_>>(), ["mover"]);
    for node in ["node-1", "node-2"] {
        assert!(c.admin.node(node).await.unwrap().tenants.is_empty(), "{node} released");
    }

    // Dedicated -> shared: shares come back on shared nodes and the dedicated node is released.
    let (status, body) =
        c.admin.request(Method::PATCH, "/v1/tenants/mover", Some(json!({"plan": shared(500, 1, 2)}))).await;
    assert_eq!(status, 200, "{body}");
    let t: Tenant = serde_json::from_value(body).unwrap();
    assert_eq!(t.placement.shares.len(), 2);
    assert!(t.placement.dedicated_nodes.is_empty());
    assert!(c.admin.node("mover-vm").await.unwrap().tenants.is_empty());
    let metrics = c.admin.metrics().await;
    let shared_after = hexa_tests::admin::metric(&metrics, "hexa_placement_seconds_count{plan=\"shared\"}");
    assert_eq!(shared_after, 2, "the create and the move back: {metrics}");
    dedicated.stop().await;
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_during_a_burst_of_creates_keeps_every_acknowledged_tenant_once() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (quic, admin_port) = (free_port(), free_port());
    let mut c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-1.log").await;
    let mut agents = Vec::new();
    for i in 1..=3 {
        let token = c.admin.token("shared", "10m").await;
        agents.push(Agent::spawn(hexa_agent::config::AgentConfig {
            coordinator: c.quic_addr.to_string(),
            token,
            ca_hash: c.ca_hash.to_string(),
            state_dir: dir.path().join(format!("agent-{i}")),
            node_name: format!("node-{i}"),
            ephemeral_path: dir.path().to_path_buf(),
            ..Default::default()
        }));
    }
    eventually(Duration::from_secs(30), "three Ready nodes", async || {
        let nodes = c.admin.nodes().await;
        (nodes.len() == 3 && nodes.iter().all(|n| n.health == Health::Ready)).then_some(())
    })
    .await;

    // Four clients create small tenants as fast as they can; the coordinator dies mid-way.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut clients = Vec::new();
    for client in 0..4 {
        let admin = c.admin.clone();
        let acked = acked_tx.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..100 {
                let name = format!("burst-{client}-{i}");
                // Small enough that the fleet (3 nodes, 110 pods each) never fills during the burst.
                let plan = json!({"kind": "shared", "cpu_millis": 100, "memory_bytes": 128u64 << 20, "pods": 1, "replicas": 1, "spread": 1});
                let body = json!({"name": name, "plan": plan});
                let request = admin.request_raw(Method::POST, "/v1/tenants", Some(body)).await;
                match request {
                    Ok((201, _)) => {
                        let _ = acked.send(name);
                    }
                    Ok((status, body)) => panic!("unexpected {status}: {body}"),
                    Err(_) => return, // the coordinator is gone
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 20 {
        acknowledged.push(acked_rx.recv().await.expect("creates acknowledged before the kill"));
    }
    c.proc.kill9();
    for client in clients {
        let _ = client.await;
    }
    while let Ok(name) = acked_rx.try_recv() {
        acknowledged.push(name);
    }

    let c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-2.log").await;
    let (status, body) = c.admin.request(Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, 200);
    let tenants: Vec<Tenant> = serde_json::from_value(body).unwrap();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &tenants {
        *count.entry(t.name.as_str()).or_default() += 1;
        assert_eq!(t.placement.shares.len(), 1, "{t:?}");
        assert_eq!(t.phase, Phase::Deploying, "{t:?}");
    }
    for name in &acknowledged {
        assert_eq!(count.get(name.as_str()), Some(&1), "acknowledged tenant {name} must be there exactly once");
    }
    // Node specs agree with the tenants after the restart: every share is on its node exactly once.
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &tenants {
        per_node.entry(t.placement.shares[0].node.clone()).or_default().push(t.name.clone());
    }
    for node in c.admin.nodes().await {
        let mut listed: Vec<String> = node.tenants.iter().map(|a| a.tenant.clone()).collect();
        listed.sort();
        let mut want = per_node.remove(&node.name).unwrap_or_default();
        want.sort();
        assert_eq!(listed, want, "{}", node.name);
    }
    eprintln!("{} acknowledged before the kill, {} tenants after the restart", acknowledged.len(), tenants.len());
    for agent in agents {
        agent.stop().await;
    }
}

/// A tenant spread over every node, one of which is drained: its share there has nowhere to go and
/// the tenant is Degraded; once the node is uncordoned the tenant is whole again without any plan
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_tenant_recovers_as_soon_as_its_nodes_are_back() {
    let (c, agents) = fleet(3).await;
    let (status, body) = create(&c.admin, "wide", shared(300, 1, 3)).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.admin.request(Method::POST, "/v1/nodes/node-2/drain", None).await;
    assert_eq!(status, 200, "{body}");
    let degraded = tenant(&c.admin, "wide").await;
    assert_eq!(degraded.phase, Phase::Degraded, "{degraded:?}");
    assert!(nodes_of(&degraded).contains(&"node-2".to_string()), "the share stays where it is stuck");

    let (status, _) = c.admin.request(Method::POST, "/v1/nodes/node-2/uncordon", None).await;
    assert_eq!(status, 200);
    let recovered = eventually(Duration::from_secs(10), "wide no longer Degraded", async || {
        let t = tenant(&c.admin, "wide").await;
        (t.phase != Phase::Degraded).then_some(t)
    })
    .await;
    let placed = recovered.conditions.iter().find(|c| format!("{:?}", c.kind) == "Placed").unwrap();
    assert!(placed.status, "{placed:?}");
    assert_eq!(nodes_of(&recovered), nodes_of(&degraded), "nothing had to move");
    for agent in agents {
        agent.stop().await;
    }
}
