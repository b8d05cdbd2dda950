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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hexa_agent_apply_installs_under_a_root_once_and_then_does_nothing() {
    use hexa_shared::k3s::{ArtifactSource, JoinToken, K3sRole, K3sSpec};
    let releases = ReleaseServer::start(&["v1.35.5+k3s1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut k3s = K3sSpec::new(K3sRole::Server { cluster_init: true, server_url: None });
    k3s.token = Some(JoinToken::new("0123456789abcdef0123456789abcdef"));
    k3s.node_name = Some("debug-node".into());
    k3s.artifacts = ArtifactSource::Url { base: releases.base.clone() };
    let spec =
        hexa_shared::spec::NodeSpec::for_pool("debug-node", &hexa_shared::names::Pool::Server, 4).with_k3s(Some(k3s));
    let spec_file = dir.path().join("spec.json");
    std::fs::write(&spec_file, serde_json::to_string(&spec).unwrap()).unwrap();
    let empty = dir.path().join("agent.toml");
    std::fs::write(&empty, "").unwrap();
    let run = || {
        let bin = hexa_tests::bin("hexa-agent");
        let spec_file = spec_file.clone();
        let root = root.clone();
        let empty = empty.clone();
        async move {
            tokio::process::Command::new(bin)
                .args(["--config", empty.to_str().unwrap(), "apply", "--spec", spec_file.to_str().unwrap()])
                .args(["--root", root.to_str().unwrap()])
                .output()
                .await
                .unwrap()
        }
    };
    let first = run().await;
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}{}", String::from_utf8_lossy(&first.stderr));
    assert!(stdout.contains("would run: systemctl Restart(\"k3s.service\")"), "{stdout}");
    assert!(stdout.contains("applied generation 4"), "{stdout}");
    assert!(root.join("usr/local/bin/k3s").exists());
    assert!(root.join("var/lib/hexabase/agent/spec.json").exists(), "the spec is recorded under the root");
    let second = run().await;
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    assert!(!stdout.contains("would run"), "a second apply asks nothing of systemd: {stdout}");
    // A broken spec is refused with the reason, and nothing under the root changes.
    std::fs::write(&spec_file, r#"{"generation": 5}"#).unwrap();
    let bad = run().await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a NodeSpec"));
}
