//! K3s through the whole product: the coordinator assigns roles by pool, agents install the
//! release it names from a release server, and report K3s running.

use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::k3s::K3sState;
use hexa_tests::artifacts::ReleaseServer;
use hexa_tests::eventually;
use hexa_tests::inproc::{Agent, Coordinator};
use hexa_tests::k3s_supervisor::Supervisor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_k3s_roles_from_their_pool_and_report_it_running() {
    let releases = ReleaseServer::start(&["v1.35.5+k3s1"]).await;
    let base = releases.base.clone();
    let pin = releases.sha256("v1.35.5+k3s1");
    let c = Coordinator::start_tuned(|config| {
        config.k3s.manage = true;
        config.k3s.artifact_base = base;
        // The release server speaks plain http: the operator pins the binary.
        config.k3s.sha256 = pin;
    })
    .await;
    let server_token = c.admin.token("server", "10m").await;
    let server_config = c.agent_config("cp-1", &server_token);
    // What the K3s server writes when it first starts: the cluster CA that secure tokens pin.
    let ca_pem = "-----BEGIN CERTIFICATE-----\nMIIBcluster-ca\n-----END CERTIFICATE-----\n";
    let ca_file = server_config.state_dir.with_extension("root").join("var/lib/rancher/k3s/server/tls/server-ca.crt");
    std::fs::create_dir_all(ca_file.parent().unwrap()).unwrap();
    std::fs::write(&ca_file, ca_pem).unwrap();
    let ca_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ca_pem.as_bytes()));
    let server = Agent::spawn(server_config);
    let worker = c.spawn_agent("worker-1").await;

    for (name, want_ca) in [("cp-1", Some(ca_hash.clone())), ("worker-1", None)] {
        let node = eventually(Duration::from_secs(30), "k3s running", async || {
            c.admin.node(name).await.filter(|n| {
                n.health == Health::Ready
                    && n.k3s.as_ref().is_some_and(|s| *s != K3sState::NotInstalled && *s != K3sState::Installing)
            })
        })
        .await;
        let want = K3sState::Running { version: "v1.35.5+k3s1".into(), cluster_ca_sha256: want_ca };
        assert_eq!(node.k3s, Some(want), "{name}");
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

    // The server holds the server token and the agent token; the worker only the agent token, in
    // the secure form that pins the cluster CA the first server reported.
    let value = |config: &str, key: &str| {
        config.lines().find_map(|l| l.strip_prefix(&format!("{key}: "))).map(|v| v.trim().trim_matches('"').to_string())
    };
    let server_secret = value(&server_config, "token").expect("server has the server token");
    let agent_secret = value(&server_config, "agent-token").expect("server has the agent token");
    assert!(server_secret.len() >= 32 && agent_secret.len() >= 32 && server_secret != agent_secret);
    let worker_token = value(&worker_config, "token").expect("worker has a token");
    assert_eq!(worker_token, format!("K10{ca_hash}::node:{agent_secret}"));
    assert!(!worker_config.contains(&server_secret), "the server token reached an agent node:\n{worker_config}");
    assert!(!worker_config.contains("agent-token"), "{worker_config}");
    let mode = |path: std::path::PathBuf| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777
    };
    for root in [&server_root, &worker_root] {
        assert_eq!(mode(root.join("etc/rancher/k3s/config.yaml")), 0o600, "{}", root.display());
    }
    for agent in [&server, &worker] {
        assert_eq!(mode(agent.config.state_dir.join("spec.json")), 0o600, "spec.json holds the join token");
    }

    // What each token opens on a K3s server: the agent token joins, but never reaches the
    // bootstrap data holding the cluster's CA keys; the server token does.
    let supervisor = Supervisor::start(ca_pem, &server_secret, &agent_secret).await;
    assert_eq!(supervisor.present(&worker_token, "/v1-k3s/client-kubelet.crt").await, Ok(200));
    assert_eq!(supervisor.present(&worker_token, "/v1-k3s/server-bootstrap").await, Ok(401));
    assert_eq!(supervisor.present(&server_secret, "/v1-k3s/server-bootstrap").await, Ok(200));
    let forged = format!("K10{}::node:{agent_secret}", "0".repeat(64));
    assert!(supervisor.present(&forged, "/v1-k3s/client-kubelet.crt").await.unwrap_err().contains("CA hash mismatch"));

    // Neither secret shows in the API or the coordinator's reports of the nodes.
    let (_, nodes) = c.admin.request(reqwest::Method::GET, "/v1/nodes", None).await;
    for secret in [&server_secret, &agent_secret] {
        assert!(!nodes.to_string().contains(secret.as_str()), "a join token leaked into the API");
    }

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
    k3s.artifacts = ArtifactSource::Url { base: releases.base.clone(), sha256: None };
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
