//! The `manifests` mode: the same objects the coordinator would apply, written as YAML files.

use std::time::Duration;

use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::store::Health;
use hexa_shared::tenant::Phase;
use hexa_tests::eventually;
use hexa_tests::inproc::Coordinator;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_written_as_manifests_and_removed_when_deleted() {
    let manifests = tempfile::tempdir().unwrap();
    let dir = manifests.path().to_path_buf();
    let c = Coordinator::start_tuned(|config| {
        config.hostcluster.mode = Mode::Manifests;
        config.hostcluster.manifests_dir = dir.clone();
    })
    .await;
    let agent = c.spawn_agent("m-node").await;
    eventually(Duration::from_secs(20), "node Ready", async || {
        c.admin.node("m-node").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");

    let chart = dir.join("tenants/acme/helmchart.yaml");
    let text =
        eventually(Duration::from_secs(10), "manifests written", async || std::fs::read_to_string(&chart).ok()).await;
    assert!(text.contains("kind: HelmChart") && text.contains("targetNamespace: hx-acme"), "{text}");
    assert!(text.contains("version: 0.36.1"), "{text}");
    let ns = std::fs::read_to_string(dir.join("tenants/acme/namespace.yaml")).unwrap();
    assert!(ns.contains("name: hx-acme") && ns.contains("pod-security.kubernetes.io/enforce: baseline"), "{ns}");
    let node = std::fs::read_to_string(dir.join("nodes/m-node.yaml")).unwrap();
    assert!(node.contains("tenant.hexabase.ai/acme") && node.contains("hexabase.ai/pool: shared"), "{node}");
    let (_, tenant) = c.admin.request(Method::GET, "/v1/tenants/acme", None).await;
    let deployed = tenant["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Deployed").cloned().unwrap();
    assert_eq!(deployed["status"], true, "{tenant}");

    // A pass with nothing to change writes nothing.
    let pass = c.running.host_cluster.reconcile().await;
    assert_eq!(pass.writes, 0, "{pass:?}");

    // Deleting removes every file of the tenant, then the tenant itself.
    let (status, body) = c.admin.request(Method::DELETE, "/v1/tenants/acme", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], json!(Phase::Deleting));
    eventually(Duration::from_secs(10), "tenant gone", async || {
        let (status, _) = c.admin.request(Method::GET, "/v1/tenants/acme", None).await;
        (status == 404).then_some(())
    })
    .await;
    assert!(!dir.join("tenants/acme").exists());
    assert!(!dir.join("nodes/m-node.yaml").exists(), "a node holding no tenant has no marks to write");
    agent.stop().await;
}
