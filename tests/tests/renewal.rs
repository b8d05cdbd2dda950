//! Node certificates are renewed over the mutual-TLS link before they expire.

use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::pki::cert_identity;
use hexa_tests::inproc::{Agent, Coordinator, fast_config};
use hexa_tests::{eventually, raw};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn leaf_serial(state_dir: &std::path::Path) -> String {
    let pem = std::fs::read(state_dir.join("node.crt")).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    cert_identity(&der).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_over_the_link_and_the_old_one_retires() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path().join("coordinator"));
    config.node_cert_validity = Duration::from_secs(12);
    let coordinator = Coordinator::start_with(config, dir).await;
    let agent = coordinator.spawn_agent("renewer").await;
    let state = agent.config.state_dir.clone();
    eventually(Duration::from_secs(20), "Ready", async || {
        coordinator.admin.node("renewer").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    let first_serial = leaf_serial(&state);
    let first_key = std::fs::read(state.join("node.key")).unwrap();
    let first_cert = std::fs::read(state.join("node.crt")).unwrap();
    let first_not_after = coordinator.admin.node("renewer").await.unwrap().cert_not_after_unix;

    // Two thirds into the 12 s lifetime the agent asks for, and stores, a new certificate. The
    // certificate lands before its key is renamed into place (a crash between them is finished at
    // the next start), so the key is waited for too.
    eventually(Duration::from_secs(20), "a renewed certificate and its key on disk", async || {
        let key = std::fs::read(state.join("node.key")).unwrap_or_default();
        (leaf_serial(&state) != first_serial && key != first_key).then_some(())
    })
    .await;
    let renewed = coordinator.admin.node("renewer").await.unwrap();
    assert!(renewed.cert_not_after_unix > first_not_after);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(state.join("node.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the new key is private too");

    // The agent uses the new certificate from its next connection on.
    agent.stop().await;
    let agent = Agent::spawn(coordinator.agent_config("renewer", ""));
    eventually(Duration::from_secs(20), "reconnected with the new certificate", async || {
        coordinator.admin.node("renewer").await.filter(|n| n.connected && n.health == Health::Ready)
    })
    .await;

    // Once the new one is in use, the old certificate opens nothing.
    let key = rcgen::KeyPair::from_pem(std::str::from_utf8(&first_key).unwrap()).unwrap();
    let creds = raw::NodeCreds {
        name: "renewer".into(),
        key_der: key.serialize_der(),
        chain: vec![CertificateDer::from_pem_slice(&first_cert).unwrap()],
        ca: CertificateDer::from_pem_slice(&std::fs::read(state.join("ca.crt")).unwrap()).unwrap(),
    };
    let reason = raw::refused_link(coordinator.running.quic_addr, creds.link_config()).await;
    assert!(reason.contains("superseded"), "{reason}");
    agent.stop().await;
}
