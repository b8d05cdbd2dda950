//! Nothing one node says decides other nodes' rules: a node that reports another tenant's IPs,
//! kube-system IPs, or a real pod's IP under another tenant gains nothing on any other node, and no
//! node refuses its spec because of it. Once with the host cluster's API (the fake API server, its
//! Pods and Nodes followed by kube-rs watchers), once without one (agents' reports, each held to
//! its node's pod range).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hexa_agent::isolation::firewall::{Firewall, MemoryFirewall, SYSTEM_SET, tenant_set_name};
use hexa_agent::pods::StaticPodSource;
use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::store::Health;
use hexa_shared::report::PodInfo;
use hexa_tests::admin::metric;
use hexa_tests::eventually;
use hexa_tests::fake_kube::{FakeKube, Verb};
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

struct Node {
    name: &'static str,
    firewall: Arc<MemoryFirewall>,
    pods: Arc<StaticPodSource>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), hexa_agent::AgentError>>,
}

impl Node {
    /// The members of each set in force on this node: tenants by name, and `sys`.
    fn sets(&self) -> BTreeMap<String, Vec<String>> {
        let Ok(rules) = self.firewall.current() else { return BTreeMap::new() };
        let mut sets = BTreeMap::new();
        for tenant in ["acme", "globex"] {
            if let Some(set) = rules.sets.get(&tenant_set_name(tenant)) {
                sets.insert(tenant.to_string(), set.members.iter().map(|ip| ip.to_string()).collect());
            }
        }
        if let Some(set) = rules.sets.get(SYSTEM_SET) {
            sets.insert("sys".to_string(), set.members.iter().map(|ip| ip.to_string()).collect());
        }
        sets
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn start_node(c: &Coordinator, name: &'static str, pool: &str, pods: Vec<PodInfo>) -> Node {
    let token = c.admin.token(pool, "10m").await;
    let config = c.agent_config(name, &token);
    let firewall = Arc::new(MemoryFirewall::new());
    let source = Arc::new(StaticPodSource::new(pods));
    let host = hexa_agent::Host { firewall: firewall.clone(), pods: source.clone(), ..test_host(&config) };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));
    Node { name, firewall, pods: source, stop, task }
}

fn sets(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
}

async fn wait_ready(c: &Coordinator, count: usize) {
    eventually(Duration::from_secs(30), "nodes Ready", async || {
        let all = c.admin.nodes().await;
        (all.len() == count && all.iter().all(|n| n.health == Health::Ready)).then_some(())
    })
    .await;
}

/// Places acme and globex with a share on each of `spread` tenant nodes.
async fn place_tenants(c: &Coordinator, spread: u32) {
    for name in ["acme", "globex"] {
        let plan = json!({"kind": "shared", "cpu_millis": 100 * spread, "memory_bytes": (256u64 << 20) * u64::from(spread),
            "pods": 10, "replicas": 1, "spread": spread});
        let (status, body) =
            c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": name, "plan": plan}))).await;
        assert_eq!(status, 201, "{body}");
    }
}

/// Every node still there has applied the spec it was last given, and none reports an error
/// applying it.
async fn no_node_refuses(c: &Coordinator) {
    eventually(Duration::from_secs(20), "every node applied its latest spec", async || {
        let nodes = c.admin.nodes().await;
        for node in &nodes {
            assert_eq!(node.apply_error, None, "{} refused its spec", node.name);
        }
        let mut there = nodes.iter().filter(|n| n.health != Health::Lost);
        there.all(|n| n.applied_generation == Some(n.spec_generation)).then_some(())
    })
    .await;
    for node in c.admin.nodes().await {
        let record = c.running.inventory.record(&node.name).unwrap();
        if let Some(isolation) = &record.spec.isolation {
            assert_eq!(isolation.validate(), Ok(()), "{}", node.name);
        }
    }
}

/// Waits until every node in `nodes` has exactly `want`.
async fn converge(nodes: &[&Node], want: &BTreeMap<String, Vec<String>>, what: &str) {
    eventually(Duration::from_secs(20), what, async || nodes.iter().all(|n| n.sets() == *want).then_some(())).await;
    for n in nodes {
        assert_eq!(n.sets(), *want, "{}", n.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_server_a_node_speaks_only_for_its_own_pod_range() {
    let c = Coordinator::start_tuned(|config| {
        config.isolation.enabled = true;
        config.isolation.management_cidrs = vec!["192.0.2.0/24".into()];
    })
    .await;
    // A server runs the cluster DNS; two honest tenant nodes; one that is about to lie.
    let cp = start_node(&c, "cp-1", "server", vec![pod("kube-system", "coredns", "10.42.0.10")]).await;
    let honest_1 = start_node(
        &c,
        "honest-1",
        "shared",
        vec![pod("hx-acme", "acme-1", "10.42.1.5"), pod("kube-system", "svclb-1", "10.42.1.10")],
    )
    .await;
    let honest_2 = start_node(
        &c,
        "honest-2",
        "shared",
        vec![pod("hx-acme", "acme-2", "10.42.2.5"), pod("hx-globex", "globex-1", "10.42.2.6")],
    )
    .await;
    let liar = start_node(&c, "liar", "shared", vec![pod("hx-acme", "acme-3", "10.42.3.5")]).await;
    wait_ready(&c, 4).await;
    place_tenants(&c, 3).await;
    // Only the server's kube-system pod is a system pod; each tenant has its pods cluster-wide.
    let truth = sets(&[
        ("acme", &["10.42.1.5", "10.42.2.5", "10.42.3.5"]),
        ("globex", &["10.42.2.6"]),
        ("sys", &["10.42.0.10"]),
    ]);
    converge(&[&honest_1, &honest_2, &liar], &truth, "the honest picture").await;
    no_node_refuses(&c).await;

    // The liar claims: a real acme pod's IP under globex, a real globex pod's IP under acme, the DNS
    // pod's IP under acme, kube-system pods in its own range and another's, and a free address
    // of another node's range. Beside them, a new pod of its own, in its own range: once that
    // shows up on the other nodes, the coordinator has acted on this report.
    liar.pods.set(vec![
        pod("hx-acme", "acme-3", "10.42.3.5"),
        pod("hx-acme", "acme-4", "10.42.3.6"),
        pod("hx-globex", "steal-1", "10.42.1.5"),
        pod("hx-acme", "steal-2", "10.42.2.6"),
        pod("hx-acme", "steal-dns", "10.42.0.10"),
        pod("kube-system", "fake-sys", "10.42.3.10"),
        pod("kube-system", "fake-sys-2", "10.42.1.99"),
        pod("hx-globex", "squat", "10.42.2.77"),
    ]);
    let with_new_pod = sets(&[
        ("acme", &["10.42.1.5", "10.42.2.5", "10.42.3.5", "10.42.3.6"]),
        ("globex", &["10.42.2.6"]),
        ("sys", &["10.42.0.10"]),
    ]);
    converge(&[&honest_1, &honest_2], &with_new_pod, "only the liar's own pod added").await;
    no_node_refuses(&c).await;
    let map = c.running.inventory.pod_owner_map();
    assert!(map.conflicts().is_empty(), "claims outside the liar's range are no claims: {:?}", map.conflicts());
    // An operator sees who made the claims that were not taken: the liar's six lies, and
    // honest-1's kube-system pod (a tenant node's word makes no system pod).
    let metrics = c.admin.metrics().await;
    assert_eq!(metric(&metrics, "hexa_pod_claims_refused{node=\"liar\"}"), 6, "{metrics}");
    assert_eq!(metric(&metrics, "hexa_pod_claims_refused{node=\"honest-1\"}"), 1, "{metrics}");
    assert!(!metrics.contains("hexa_pod_claims_refused{node=\"honest-2\"}"), "{metrics}");
    assert!(metrics.contains("\nhexa_pod_ip_conflicts 0\n"), "{metrics}");

    // A claim inside its own range under two tenants is dropped from every set, not refused.
    liar.pods.set(vec![pod("hx-acme", "acme-3", "10.42.3.5"), pod("hx-globex", "twice", "10.42.3.5")]);
    let without = sets(&[("acme", &["10.42.1.5", "10.42.2.5"]), ("globex", &["10.42.2.6"]), ("sys", &["10.42.0.10"])]);
    converge(&[&honest_1, &honest_2], &without, "the doubly claimed IP dropped").await;
    no_node_refuses(&c).await;
    assert_eq!(metric(&c.admin.metrics().await, "hexa_pod_ip_conflicts"), 1);
    liar.pods.set(vec![pod("hx-acme", "acme-3", "10.42.3.5")]);
    converge(&[&honest_1, &honest_2], &truth, "the IP back once claimed once").await;

    // A Lost node's report expires: its pods leave every other node's sets.
    liar.stop().await;
    eventually(Duration::from_secs(20), "the liar Lost", async || {
        (c.admin.node("liar").await?.health == Health::Lost).then_some(())
    })
    .await;
    let without_liar =
        sets(&[("acme", &["10.42.1.5", "10.42.2.5"]), ("globex", &["10.42.2.6"]), ("sys", &["10.42.0.10"])]);
    converge(&[&honest_1, &honest_2], &without_liar, "the Lost node's pods gone").await;
    no_node_refuses(&c).await;
    for node in [cp, honest_1, honest_2] {
        node.stop().await;
    }
}

async fn coordinator_on(kube: &FakeKube) -> Coordinator {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig_yaml()).unwrap();
    let path = kubeconfig.display().to_string();
    let c = Coordinator::start_tuned(|config| {
        config.isolation.enabled = true;
        config.isolation.management_cidrs = vec!["192.0.2.0/24".into()];
        config.hostcluster.mode = Mode::Apply;
        config.hostcluster.kubeconfig = path;
    })
    .await;
    // The kubeconfig lives as long as the test.
    std::mem::forget(dir);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_server_only_the_api_says_whose_a_pod_is() {
    let kube = FakeKube::start().await;
    let c = coordinator_on(&kube).await;
    assert!(c.running.inventory.pod_owners_use_api());
    // The nodes register (10.42.0.0/24, 10.42.1.0/24, 10.42.2.0/24) and the pods run.
    for name in ["api-1", "api-2", "api-liar"] {
        kube.add_node(name, &[]).unwrap();
    }
    assert_eq!(kube.object("nodes", "", "api-2").unwrap()["spec"]["podCIDR"], "10.42.1.0/24");
    kube.add_pod("kube-system", "coredns", "api-1", "10.42.0.10").unwrap();
    kube.add_pod("hx-acme", "acme-1", "api-1", "10.42.0.5").unwrap();
    kube.add_pod("hx-acme", "acme-2", "api-2", "10.42.1.5").unwrap();
    kube.add_pod("hx-globex", "globex-1", "api-2", "10.42.1.6").unwrap();
    kube.add_pod("hx-acme", "acme-3", "api-liar", "10.42.2.5").unwrap();
    let api_1 = start_node(&c, "api-1", "shared", vec![]).await;
    let api_2 = start_node(&c, "api-2", "shared", vec![]).await;
    // The liar's agent reports another tenant's IPs, kube-system IPs, and real pods' IPs under
    // other tenants.
    let liar = start_node(
        &c,
        "api-liar",
        "shared",
        vec![
            pod("hx-acme", "acme-3", "10.42.2.5"),
            pod("hx-globex", "steal-1", "10.42.0.5"),
            pod("hx-acme", "steal-2", "10.42.1.6"),
            pod("kube-system", "fake-sys", "10.42.2.10"),
            pod("hx-acme", "steal-dns", "10.42.0.10"),
        ],
    )
    .await;
    wait_ready(&c, 3).await;
    place_tenants(&c, 3).await;
    let truth = sets(&[
        ("acme", &["10.42.0.5", "10.42.1.5", "10.42.2.5"]),
        ("globex", &["10.42.1.6"]),
        ("sys", &["10.42.0.10"]),
    ]);
    converge(&[&api_1, &api_2, &liar], &truth, "the API's picture").await;
    no_node_refuses(&c).await;

    // The liar's kubelet writes what it may into the API: a pod of its own with globex's real
    // IP (another node's range), and a mirror pod in kube-system. Neither counts.
    kube.add_pod("hx-acme", "steal-3", "api-liar", "10.42.1.6").unwrap();
    let mirror = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "static-sys", "namespace": "kube-system",
            "annotations": {"kubernetes.io/config.mirror": "0123abcd"}},
        "spec": {"nodeName": "api-liar", "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": "10.42.2.11", "podIPs": [{"ip": "10.42.2.11"}]}
    });
    kube.upsert("pods", mirror, "kubelet").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    converge(&[&api_1, &api_2], &truth, "the honest nodes unchanged").await;
    no_node_refuses(&c).await;
    let metrics = c.admin.metrics().await;
    assert_eq!(metric(&metrics, "hexa_pod_claims_refused{node=\"api-liar\"}"), 1, "{metrics}");

    // Two pods the API holds with one IP under two tenants: the IP leaves every set.
    kube.add_pod("hx-globex", "stale", "api-2", "10.42.1.5").unwrap();
    let conflicted =
        sets(&[("acme", &["10.42.0.5", "10.42.2.5"]), ("globex", &["10.42.1.6"]), ("sys", &["10.42.0.10"])]);
    converge(&[&api_1, &api_2, &liar], &conflicted, "the doubly owned IP dropped").await;
    no_node_refuses(&c).await;
    kube.delete("pods", "hx-globex", "stale").unwrap();
    converge(&[&api_1, &api_2, &liar], &truth, "the IP back").await;

    // While the watchers are cut off, pods change and the history is compacted: resuming answers
    // 410 Gone, and the watchers list again and catch up.
    kube.set_down(true);
    kube.delete("pods", "hx-acme", "acme-2").unwrap();
    kube.add_pod("hx-acme", "acme-4", "api-2", "10.42.1.7").unwrap();
    kube.compact();
    kube.reset_counters();
    kube.set_down(false);
    let after = sets(&[
        ("acme", &["10.42.0.5", "10.42.1.7", "10.42.2.5"]),
        ("globex", &["10.42.1.6"]),
        ("sys", &["10.42.0.10"]),
    ]);
    converge(&[&api_1, &api_2, &liar], &after, "the relisted picture").await;
    let relisted = kube.requests().iter().any(|r| r.verb == Some(Verb::List) && r.resource == "pods");
    assert!(relisted, "the pods were listed again after the 410");
    no_node_refuses(&c).await;
    for node in [api_1, api_2, liar] {
        node.stop().await;
    }
}
