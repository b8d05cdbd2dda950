//! K3s through the whole product: the coordinator assigns roles by pool, agents install the
//! release it names from a release server, and report K3s running.

use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::k3s::K3sState;
use hexa_tests::artifacts::ReleaseServer;
use hexa_tests::eventually;
use hexa_tests::inproc::{Agent, Coordinator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_k3s_roles_from_their_pool_and_report_it_running() {
    let releases = ReleaseServer::start(&["v1.35.5+k3s1"]).await;
    let base = releases.base.clone();
    let c = Coordinator::start_tuned(|config| {
        config.k3s.manage = true;
        config.k3s.artifact_base = base;
    })
    .await;
    let server_token = c.admin.token("server", "10m").await;
    let server = Agent::spawn(c.agent_config("cp-1", &server_token));
    let worker = c.spawn_agent("worker-1").await;

    for (name, want) in [("cp-1", "v1.35.5+k3s1"), ("worker-1", "v1.35.5+k3s1")] {
        let node = eventually(Duration::from_secs(30), "k3s running", async || {
            c.admin.node(name).await.filter(|n| {
                n.health == Health::Ready
                    && n.k3s.as_ref().is_some_and(|s| *s != K3sState::NotInstalled && *s != K3sState::Installing)
            })
        })
        .await;
        assert_eq!(node.k3s, Some(K3sState::Running { version: want.into() }), "{name}");
        assert_eq!(node.applied_generation, Some(node.spec_generation), "{name}: {:?}", node.apply_error);
    }

    let root_of = |agent: &Agent| agent.config.state_dir.with_extension("root");
    let server_root = root_of(&server);
    let worker_root = root_of(&worker);
    let server_config = std::fs::read_to_string(server_root.join("etc/rancher/k3s/config.yaml")).unwrap();
    let worker_config = std::fs::read_to_string(worker_root.join("etc/rancher/k3s/config.yaml")).unwrap();
    // The first server initialises the cluster; the worker joins it at the server's address.
    assert!(server_config.contains("cluster-init: true"), "{server_config}");
    assert!(!server_config.contains("server:"), "{server_config}");
    assert!(worker_config.contains("server: \"https://127.0.0.1:6443\""), "{worker_config}");
    assert!(server_root.join("etc/systemd/system/k3s.service").exists());
    assert!(worker_root.join("etc/systemd/system/k3s-agent.service").exists());
    assert!(
        server_config.contains("node-label:") && server_config.contains("hexabase.ai/pool=server"),
        "{server_config}"
    );
    assert!(worker_config.contains("hexabase.ai/pool=shared"), "{worker_config}");
    assert!(
        worker_config.contains("kubelet-arg:") && worker_config.contains("system-reserved=cpu=250m,memory=512Mi"),
        "{worker_config}"
    );

    // Both got the same join token over their link; it is private on disk and the API never shows it.
    let token_line = |config: &str| config.lines().find(|l| l.starts_with("token:")).map(str::to_string);
    let token = token_line(&server_config).expect("server has the token");
    assert_eq!(token_line(&worker_config).as_ref(), Some(&token));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(worker_root.join("etc/rancher/k3s/config.yaml")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let secret = token.trim_start_matches("token:").trim().trim_matches('"').to_string();
    assert!(secret.len() >= 32, "{secret}");
    let (_, nodes) = c.admin.request(reqwest::Method::GET, "/v1/nodes", None).await;
    assert!(!nodes.to_string().contains(&secret), "the join token leaked into the API");

    server.stop().await;
    worker.stop().await;
}
