//! A platform from nothing: a coordinator in `apply` mode without a kubeconfig serves, tenants wait
//! for the host cluster with the reason, and the first `server` node whose K3s runs mints the
//! coordinator's narrow ServiceAccount through its own K3s and sends it back over its link.
//!
//! The stand-in K3s is the release server's `k3s` (its `kubectl` says the Node is Ready) and the
//! fake Kubernetes API server, whose admin kubeconfig the test writes where K3s writes
//! `k3s.yaml` when it starts; the fake runs the token controller and holds ServiceAccount tokens to
//! their RBAC, so the coordinator's every call must be one its ClusterRole grants.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hexa_coordinator::hostcluster::access::STORED_KUBECONFIG;
use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::store::Health;
use hexa_shared::host_access::{CLUSTER_ROLE, COORDINATOR_RULES, NAMESPACE, SERVICE_ACCOUNT, TOKEN_SECRET};
use hexa_shared::k3s::K3sState;
use hexa_shared::tenant::{Phase, Tenant, reasons};
use hexa_tests::artifacts::ReleaseServer;
use hexa_tests::eventually;
use hexa_tests::fake_kube::FakeKube;
use hexa_tests::inproc::{Agent, Coordinator};
use reqwest::Method;
use serde_json::{Value, json};

const K3S: &str = "v1.35.5+k3s1";

/// The test's coordinator must find no kubeconfig of its own: kube's inference would take it.
fn no_inferred_kubeconfig() {
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".kube/config"));
    assert!(
        std::env::var_os("KUBECONFIG").is_none()
            && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
            && !home.is_some_and(|h| h.exists()),
        "this test needs an environment without KUBECONFIG, ~/.kube/config or an in-cluster service account"
    );
}

async fn tenant(c: &Coordinator, name: &str) -> Option<Tenant> {
    let (status, body) = c.admin.request(Method::GET, &format!("/v1/tenants/{name}"), None).await;
    (status == 200).then(|| serde_json::from_value(body).unwrap())
}

fn deployed(t: &Tenant) -> Option<(bool, String, String)> {
    let v = serde_json::to_value(t).unwrap();
    v["conditions"].as_array()?.iter().find(|c| c["type"] == "Deployed").map(|c| {
        (
            c["status"].as_bool().unwrap_or(false),
            c["reason"].as_str().unwrap_or("").into(),
            c["message"].as_str().unwrap_or("").into(),
        )
    })
}

async fn waiting_message(c: &Coordinator, needle: &str) -> String {
    eventually(Duration::from_secs(30), needle, async || {
        let t = tenant(c, "acme").await?;
        let (status, reason, message) = deployed(&t)?;
        (!status && reason == reasons::WAITING_FOR_HOST_CLUSTER && message.contains(needle)).then_some(message)
    })
    .await
}

/// A coordinator that manages K3s from `releases`, in `apply` mode, with `kubeconfig` (empty:
/// none).
async fn coordinator(releases: &ReleaseServer, kubeconfig: String) -> Coordinator {
    let (base, pin) = (releases.base.clone(), releases.sha256(K3S));
    Coordinator::start_tuned(move |config| {
        config.hostcluster.mode = Mode::Apply;
        config.hostcluster.kubeconfig = kubeconfig;
        config.k3s.manage = true;
        config.k3s.artifact_base = base;
        config.k3s.sha256 = pin;
    })
    .await
}

/// Where the agent's K3s keeps its files (the in-process agent's root).
fn k3s_root(agent_state: &Path) -> std::path::PathBuf {
    agent_state.with_extension("root")
}

/// Plays the K3s server's start: the cluster CA and the admin kubeconfig, pointing at `kube`.
fn k3s_started(root: &Path, kube: &FakeKube) {
    let tls = root.join("var/lib/rancher/k3s/server/tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("server-ca.crt"), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        .unwrap();
    let etc = root.join("etc/rancher/k3s");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("k3s.yaml"), kube.kubeconfig_yaml()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_nothing_the_first_server_node_gives_the_coordinator_its_host_cluster() {
    no_inferred_kubeconfig();
    let kube = FakeKube::start().await;
    let releases = ReleaseServer::start(&[K3S]).await;
    let c = coordinator(&releases, String::new()).await;

    // It serves with no host cluster at all.
    let (status, _) = c.admin.request(Method::GET, "/healthz", None).await;
    assert_eq!(status, 200);
    assert!(c.running.host_cluster.needs_access());

    // A shared node and a tenant on it, which waits for the host cluster and says so.
    kube.add_node("w1", &[("kubernetes.io/hostname", "w1")]).unwrap();
    let worker = c.spawn_agent("w1").await;
    eventually(Duration::from_secs(30), "w1 Ready", async || {
        c.admin.node("w1").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 512u64 << 20, "pods": 10, "replicas": 1, "spread": 1});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");
    let message = waiting_message(&c, "no server node runs K3s yet").await;
    assert!(message.starts_with("waiting for the host cluster: no kubeconfig is configured"), "{message}");
    assert!(kube.object("namespaces", "", "hx-acme").is_none());

    // A server node whose K3s has not written its admin kubeconfig yet cannot help, and the
    // tenant's condition says which node said what.
    let server_token = c.admin.token("server", "10m").await;
    let server_config = c.agent_config("cp-1", &server_token);
    let root = k3s_root(&server_config.state_dir);
    let server = Agent::spawn(server_config);
    eventually(Duration::from_secs(30), "cp-1 runs K3s", async || {
        c.admin.node("cp-1").await.filter(|n| matches!(n.k3s, Some(K3sState::Running { .. })))
    })
    .await;
    let message = waiting_message(&c, "node cp-1: no K3s admin kubeconfig at").await;
    assert!(message.contains("no server node gave access yet"), "{message}");

    // K3s writes k3s.yaml: the next pass gets access through the node and realises the tenant.
    k3s_started(&root, &kube);
    eventually(Duration::from_secs(60), "HelmChart applied", async || {
        kube.object("helmcharts", "kube-system", "vcluster-acme")
    })
    .await;
    assert!(!c.running.host_cluster.needs_access());

    // The node minted exactly the narrow account: its ClusterRole holds the rules and nothing else.
    assert!(kube.object("serviceaccounts", NAMESPACE, SERVICE_ACCOUNT).is_some());
    let role = kube.object("clusterroles", "", CLUSTER_ROLE).expect("ClusterRole");
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    assert_eq!(rules.len(), COORDINATOR_RULES.len(), "{role}");
    for (rule, want) in rules.iter().zip(COORDINATOR_RULES) {
        assert_eq!(rule["apiGroups"], json!([want.api_group]));
        assert_eq!(rule["resources"], json!(want.resources));
        assert_eq!(rule["verbs"], json!(want.verbs));
    }

    // Kept 0600 in the state directory: the API server at the node's address, with the token.
    let stored = c.running.admin_token_path.with_file_name(STORED_KUBECONFIG);
    assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o600);
    let kubeconfig: Value = serde_json::from_str(&std::fs::read_to_string(&stored).unwrap()).unwrap();
    assert_eq!(kubeconfig["clusters"][0]["cluster"]["server"], kube.url());
    let token = kubeconfig["users"][0]["user"]["token"].as_str().unwrap().to_string();
    let secret = kube.object("secrets", NAMESPACE, TOKEN_SECRET).expect("token Secret");
    use base64::Engine;
    let minted = base64::engine::general_purpose::STANDARD.decode(secret["data"]["token"].as_str().unwrap()).unwrap();
    assert_eq!(token.as_bytes(), minted.as_slice());

    // That token does what the coordinator needs and nothing else.
    let http = reqwest::Client::new();
    let get = async |path: &str, token: &str| {
        http.get(format!("{}{path}", kube.url())).bearer_auth(token).send().await.unwrap().status().as_u16()
    };
    assert_eq!(get("/api/v1/nodes", &token).await, 200);
    assert_eq!(get("/api/v1/namespaces/kube-system/secrets", &token).await, 403);
    assert_eq!(get("/apis/rbac.authorization.k8s.io/v1/clusterroles", &token).await, 403);
    assert_eq!(get("/api/v1/nodes", "forged").await, 401);

    // Every write the coordinator made went through that token's rights: the node holding the
    // share is labelled, and with the install done the tenant is Ready.
    eventually(Duration::from_secs(30), "w1 labelled", async || {
        let node = kube.object("nodes", "", "w1")?;
        (node["metadata"]["labels"]["tenant.hexabase.ai/acme"] == "true").then_some(())
    })
    .await;
    kube.complete_job("kube-system", "helm-install-vcluster-acme").unwrap();
    kube.make_statefulset_ready("hx-acme", "vcluster-acme").unwrap();
    let ready = eventually(Duration::from_secs(30), "tenant Ready", async || {
        tenant(&c, "acme").await.filter(|t| t.phase == Phase::Ready)
    })
    .await;
    assert_eq!(deployed(&ready).map(|d| d.0), Some(true));

    // After a restart the kept access is used at once, with no server node to ask.
    server.stop().await;
    worker.stop().await;
    let Coordinator { running, dir, .. } = c;
    running.shutdown().await;
    let mut config = hexa_tests::inproc::fast_config(dir.path().join("coordinator"));
    config.hostcluster.mode = Mode::Apply;
    // The links' own tasks let go of the state database a moment after shutdown returns.
    let again = eventually(Duration::from_secs(15), "the coordinator restarted on its state", async || {
        hexa_coordinator::start(config.clone()).await.ok()
    })
    .await;
    assert!(!again.host_cluster.needs_access());
    assert!(again.host_cluster.client().is_some());
    again.shutdown().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_given_kubeconfig_wins_and_no_node_is_asked() {
    let kube = FakeKube::start().await;
    let releases = ReleaseServer::start(&[K3S]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kube.kubeconfig_yaml()).unwrap();
    let c = coordinator(&releases, path.display().to_string()).await;
    assert!(!c.running.host_cluster.needs_access());

    let server_token = c.admin.token("server", "10m").await;
    let server_config = c.agent_config("cp-1", &server_token);
    k3s_started(&k3s_root(&server_config.state_dir), &kube);
    let server = Agent::spawn(server_config);
    eventually(Duration::from_secs(30), "cp-1 runs K3s", async || {
        c.admin.node("cp-1").await.filter(|n| matches!(n.k3s, Some(K3sState::Running { .. })))
    })
    .await;
    // A tenant is realised with the operator's credentials, and the node minted nothing.
    kube.add_node("w1", &[("kubernetes.io/hostname", "w1")]).unwrap();
    let worker = c.spawn_agent("w1").await;
    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 512u64 << 20, "pods": 10, "replicas": 1, "spread": 1});
    eventually(Duration::from_secs(30), "w1 Ready", async || {
        c.admin.node("w1").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(30), "HelmChart applied", async || {
        kube.object("helmcharts", "kube-system", "vcluster-acme")
    })
    .await;
    assert!(kube.object("serviceaccounts", NAMESPACE, SERVICE_ACCOUNT).is_none());
    assert!(!c.running.admin_token_path.with_file_name(STORED_KUBECONFIG).exists());
    server.stop().await;
    worker.stop().await;
}
