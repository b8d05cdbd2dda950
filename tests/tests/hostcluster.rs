//! Tenants realised on a host cluster: the real kube client against the fake API server.

use std::time::Duration;

use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::store::Health;
use hexa_shared::tenant::{Phase, Tenant};
use hexa_tests::eventually;
use hexa_tests::fake_kube::{FakeKube, Verb};
use hexa_tests::inproc::{Agent, Coordinator};
use reqwest::Method;
use serde_json::{Value, json};

async fn coordinator_on(kube: &FakeKube) -> Coordinator {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig_yaml()).unwrap();
    let path = kubeconfig.display().to_string();
    let c = Coordinator::start_tuned(|config| {
        config.hostcluster.mode = Mode::Apply;
        config.hostcluster.kubeconfig = path;
    })
    .await;
    // The kubeconfig lives as long as the test.
    std::mem::forget(dir);
    c
}

async fn tenant(c: &Coordinator, name: &str) -> Option<Tenant> {
    let (status, body) = c.admin.request(Method::GET, &format!("/v1/tenants/{name}"), None).await;
    (status == 200).then(|| serde_json::from_value(body).unwrap())
}

fn condition(t: &Tenant, kind: &str) -> Option<(bool, String, String)> {
    let v = serde_json::to_value(t).unwrap();
    v["conditions"].as_array()?.iter().find(|c| c["type"] == kind).map(|c| {
        (
            c["status"].as_bool().unwrap_or(false),
            c["reason"].as_str().unwrap_or("").into(),
            c["message"].as_str().unwrap_or("").into(),
        )
    })
}

fn labels(node: &Value) -> serde_json::Map<String, Value> {
    node["metadata"]["labels"].as_object().cloned().unwrap_or_default()
}

async fn ready_nodes(c: &Coordinator, kube: &FakeKube, names: &[&str]) -> Vec<Agent> {
    let mut agents = Vec::new();
    for name in names {
        // The kubelet registers the Node; the fake stands in for it.
        kube.add_node(name, &[("kubernetes.io/hostname", name)]).unwrap();
        agents.push(c.spawn_agent(name).await);
    }
    eventually(Duration::from_secs(30), "nodes Ready", async || {
        let nodes = c.admin.nodes().await;
        (nodes.len() >= names.len() && nodes.iter().all(|n| n.health == Health::Ready)).then_some(())
    })
    .await;
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_realised_becomes_ready_moves_to_dedicated_and_leaves_nothing_behind() {
    let kube = FakeKube::start().await;
    let c = coordinator_on(&kube).await;
    let agents = ready_nodes(&c, &kube, &["n1", "n2", "n3"]).await;
    let plan = json!({"kind": "shared", "cpu_millis": 1000, "memory_bytes": 2u64 << 30, "pods": 20, "replicas": 1, "spread": 2});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");
    let placed: Tenant = serde_json::from_value(body).unwrap();
    let share_nodes: Vec<String> = placed.placement.shares.iter().map(|s| s.node.clone()).collect();

    // Namespace, HelmChart and node labels appear.
    eventually(Duration::from_secs(15), "HelmChart applied", async || {
        kube.object("helmcharts", "kube-system", "vcluster-acme")
    })
    .await;
    let ns = kube.object("namespaces", "", "hx-acme").expect("namespace");
    assert_eq!(labels(&ns)["hexabase.ai/tenant"], "acme");
    assert_eq!(labels(&ns)["pod-security.kubernetes.io/enforce"], "baseline");
    let chart = kube.object("helmcharts", "kube-system", "vcluster-acme").unwrap();
    assert_eq!(chart["spec"]["targetNamespace"], "hx-acme");
    assert_eq!(chart["spec"]["version"], "0.36.1");
    eventually(Duration::from_secs(15), "share nodes labelled", async || {
        share_nodes
            .iter()
            .all(|n| {
                kube.object("nodes", "", n)
                    .is_some_and(|o| labels(&o).get("tenant.hexabase.ai/acme") == Some(&json!("true")))
            })
            .then_some(())
    })
    .await;
    let idle: Vec<&str> = ["n1", "n2", "n3"].into_iter().filter(|n| !share_nodes.contains(&n.to_string())).collect();
    assert!(!labels(&kube.object("nodes", "", idle[0]).unwrap()).contains_key("tenant.hexabase.ai/acme"));

    // The helm-controller finishes the install and the StatefulSet comes up: the tenant is Ready.
    assert_ne!(tenant(&c, "acme").await.unwrap().phase, Phase::Ready);
    kube.complete_job("kube-system", "helm-install-vcluster-acme").unwrap();
    kube.make_statefulset_ready("hx-acme", "vcluster-acme").unwrap();
    let ready = eventually(Duration::from_secs(15), "tenant Ready", async || {
        tenant(&c, "acme").await.filter(|t| t.phase == Phase::Ready)
    })
    .await;
    assert_eq!(condition(&ready, "Deployed").map(|c| c.0), Some(true));

    // Nothing changed: a pass sends no write.
    let writes = kube.writes();
    let pass = c.running.host_cluster.reconcile().await;
    assert_eq!(pass.writes, 0, "{pass:?}");
    assert_eq!(kube.writes(), writes, "the API server saw a write in a no-op pass");

    // Switch to dedicated: the dedicated node gets the taint and label, the values follow, and the
    // shared nodes lose the tenant label.
    let (_, token) = c
        .admin
        .request(Method::POST, "/v1/tokens", Some(json!({"pool": "dedicated:acme", "node_class": "S", "ttl": "10m"})))
        .await;
    kube.add_node("acme-vm", &[]).unwrap();
    let vm = Agent::spawn(c.agent_config("acme-vm", token["token"].as_str().unwrap()));
    let (status, body) = c
        .admin
        .request(
            Method::PATCH,
            "/v1/tenants/acme",
            Some(json!({"plan": {"kind": "dedicated", "node_class": "S", "count": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(20), "dedicated node tainted and shared nodes cleared", async || {
        let vm_node = kube.object("nodes", "", "acme-vm")?;
        let tainted = vm_node["spec"]["taints"].as_array().is_some_and(|t| {
            t.iter().any(|t| t["key"] == "hexabase.ai/dedicated" && t["value"] == "acme" && t["effect"] == "NoSchedule")
        });
        let cleared = share_nodes
            .iter()
            .all(|n| kube.object("nodes", "", n).is_some_and(|o| !labels(&o).contains_key("tenant.hexabase.ai/acme")));
        (tainted && labels(&vm_node).get("tenant.hexabase.ai/acme") == Some(&json!("true")) && cleared).then_some(())
    })
    .await;
    let chart = kube.object("helmcharts", "kube-system", "vcluster-acme").unwrap();
    let values = chart["spec"]["valuesContent"].as_str().unwrap();
    assert!(values.contains("enforceTolerations") && values.contains("hexabase.ai/dedicated"), "{values}");

    // Delete: the HelmChart's delete Job runs, then the namespace goes, then nothing is left.
    let (status, _) = c.admin.request(Method::DELETE, "/v1/tenants/acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(tenant(&c, "acme").await.map(|t| t.phase), Some(Phase::Deleting));
    eventually(Duration::from_secs(15), "delete Job created", async || {
        kube.object("jobs", "kube-system", "helm-delete-vcluster-acme")
    })
    .await;
    kube.complete_job("kube-system", "helm-delete-vcluster-acme").unwrap();
    eventually(Duration::from_secs(20), "tenant gone", async || tenant(&c, "acme").await.is_none().then_some(())).await;
    assert!(kube.object("helmcharts", "kube-system", "vcluster-acme").is_none());
    assert!(kube.object("namespaces", "", "hx-acme").is_none());
    for node in kube.list("nodes", None) {
        let marks: Vec<String> = labels(&node).keys().filter(|k| k.contains("acme")).cloned().collect();
        assert!(marks.is_empty(), "{marks:?} left on {}", node["metadata"]["name"]);
        assert!(!node["spec"]["taints"].to_string().contains("acme"), "taint left on {}", node["metadata"]["name"]);
    }
    vm.stop().await;
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_failures_become_conditions_and_the_coordinator_converges_when_the_server_returns() {
    let kube = FakeKube::start().await;
    let c = coordinator_on(&kube).await;
    let agents = ready_nodes(&c, &kube, &["e1"]).await;
    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1});

    // The API server answers 500 to everything: the condition says so, the admin API keeps working.
    kube.fail_all(Some(500));
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "flaky", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");
    let t = eventually(Duration::from_secs(15), "ApiServerError condition", async || {
        tenant(&c, "flaky").await.filter(|t| condition(t, "Deployed").is_some_and(|c| !c.0 && c.1 == "ApiServerError"))
    })
    .await;
    assert!(condition(&t, "Deployed").unwrap().2.contains("500"), "{t:?}");
    assert_eq!(reqwest::get(format!("{}/healthz", c.admin.base)).await.unwrap().status(), 200);

    // The API server goes away entirely.
    kube.fail_all(None);
    kube.set_down(true);
    eventually(Duration::from_secs(30), "ApiServerUnreachable condition", async || {
        tenant(&c, "flaky").await.filter(|t| condition(t, "Deployed").is_some_and(|c| c.1 == "ApiServerUnreachable"))
    })
    .await;

    // It returns: the tenant converges on its own.
    kube.set_down(false);
    eventually(Duration::from_secs(60), "deployed after the server returned", async || {
        tenant(&c, "flaky").await.filter(|t| condition(t, "Deployed").is_some_and(|c| c.0))
    })
    .await;
    assert!(kube.object("helmcharts", "kube-system", "vcluster-flaky").is_some());

    // RBAC denial and a missing CRD are named as such.
    kube.fail_next(Verb::Get, "helmcharts", 403, 100);
    let plan2 = json!({"kind": "shared", "cpu_millis": 200, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1});
    c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "denied", "plan": plan2}))).await;
    eventually(Duration::from_secs(15), "Forbidden condition", async || {
        tenant(&c, "denied")
            .await
            .filter(|t| condition(t, "Deployed").is_some_and(|c| c.1 == "Forbidden" && c.2.contains("RBAC")))
    })
    .await;
    kube.clear_faults();
    kube.set_served("helmcharts", false);
    let plan3 = json!({"kind": "shared", "cpu_millis": 200, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1});
    c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "nocrd", "plan": plan3}))).await;
    eventually(Duration::from_secs(30), "CrdMissing condition", async || {
        tenant(&c, "nocrd").await.filter(|t| {
            condition(t, "Deployed").is_some_and(|c| c.1 == "CrdMissing" && c.2.contains("helm-controller"))
        })
    })
    .await;
    kube.set_served("helmcharts", true);

    // A failed install Job is reported with its message.
    eventually(Duration::from_secs(60), "install Job created", async || {
        kube.object("jobs", "kube-system", "helm-install-vcluster-flaky")
    })
    .await;
    kube.fail_job("kube-system", "helm-install-vcluster-flaky", "chart vcluster-0.36.1 not found").unwrap();
    eventually(Duration::from_secs(60), "DeployFailed condition", async || {
        tenant(&c, "flaky").await.filter(|t| {
            condition(t, "Deployed").is_some_and(|c| !c.0 && c.2.contains("chart vcluster-0.36.1 not found"))
        })
    })
    .await;
    for agent in agents {
        agent.stop().await;
    }
}
