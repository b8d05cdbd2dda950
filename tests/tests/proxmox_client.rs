//! The coordinator's Proxmox VE client against the emulator: TLS trust by pinned fingerprint or
//! CA file, PVE's error shapes (per-parameter 400s, reasons in the status line), retries, and
//! task following.

use std::time::Duration;

use hexa_coordinator::proxmox::client::{CloneRequest, ProxmoxClient, ProxmoxError, Upid};
use hexa_tests::dedicated::{self, TEMPLATES};
use hexa_tests::pve::{Fault, Pve, Timings};
use reqwest::Method;

async fn emulator() -> (Pve, tempfile::TempDir) {
    hexa_tests::init();
    (Pve::start(Timings::fast(), &TEMPLATES).await, tempfile::tempdir().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_is_the_pinned_fingerprint_or_the_configured_ca() {
    let (pve, dir) = emulator().await;
    let settings = dedicated::settings(&pve, dir.path(), 7443);
    let pinned = ProxmoxClient::new(&settings).unwrap();
    assert_eq!(pinned.nodes().await.unwrap().len(), 2);

    let wrong = hexa_coordinator::proxmox::ProxmoxSettings { fingerprint: "AB".repeat(32), ..settings.clone() };
    let err = ProxmoxClient::new(&wrong).unwrap().request_once::<serde_json::Value>(Method::GET, "/version", &[]).await;
    let text = format!("{:?}", err.unwrap_err());
    assert!(text.contains("fingerprint"), "{text}");

    let ca = dir.path().join("pve-ca.pem");
    std::fs::write(&ca, &pve.cert_pem).unwrap();
    let by_ca =
        hexa_coordinator::proxmox::ProxmoxSettings { fingerprint: String::new(), ca_file: ca, ..settings.clone() };
    assert_eq!(ProxmoxClient::new(&by_ca).unwrap().next_id().await.unwrap(), 100);

    let other_ca = dir.path().join("other.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    std::fs::write(&other_ca, cert.pem()).unwrap();
    let untrusted = hexa_coordinator::proxmox::ProxmoxSettings { ca_file: other_ca, ..by_ca };
    assert!(ProxmoxClient::new(&untrusted).unwrap().nodes().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pve_errors_read_as_pve_words_them() {
    let (pve, dir) = emulator().await;
    let settings = dedicated::settings(&pve, dir.path(), 7443);
    let client = ProxmoxClient::new(&settings).unwrap();
    // Ill-typed and unknown parameters: 400 with the reason phrase and one entry per parameter.
    let err = client
        .request_once::<String>(
            Method::POST,
            "/nodes/pve1/qemu/9000/clone",
            &[("newid", "abc".into()), ("colour", "red".into())],
        )
        .await
        .unwrap_err();
    let ProxmoxError::Api { status, message, .. } = &err else { panic!("{err:?}") };
    assert_eq!(*status, 400);
    assert!(message.starts_with("Parameter verification failed."), "{message}");
    assert!(message.contains("newid: type check ('integer') failed - got 'abc'"), "{message}");
    assert!(message.contains("colour: property is not defined in schema"), "{message}");
    assert!(!err.is_transient());
    // A 5xx whose reason is only in the status line.
    pve.inject(Fault::Http { status: 596, reason: "Connection timed out".into(), count: 1 });
    let err = client.request_once::<serde_json::Value>(Method::GET, "/cluster/nextid", &[]).await.unwrap_err();
    assert!(
        matches!(&err, ProxmoxError::Api { status: 596, message, .. } if message == "Connection timed out"),
        "{err:?}"
    );
    assert!(err.is_transient());
    // ... which `request` retries.
    pve.inject(Fault::Http { status: 500, reason: "Internal Server Error".into(), count: 2 });
    assert_eq!(client.next_id().await.unwrap(), 100);
    // A wrong token.
    let bad_token = dir.path().join("bad.token");
    std::fs::write(&bad_token, "root@pam!x=nope").unwrap();
    let other =
        ProxmoxClient::new(&hexa_coordinator::proxmox::ProxmoxSettings { token_file: bad_token, ..settings.clone() })
            .unwrap();
    let err = other.nodes().await.unwrap_err();
    assert!(matches!(&err, ProxmoxError::Api { status: 401, .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_followed_by_upid_and_a_locked_vm_says_so() {
    let (pve, dir) = emulator().await;
    let client = ProxmoxClient::new(&dedicated::settings(&pve, dir.path(), 7443)).unwrap();
    let request = CloneRequest {
        template_node: "pve1",
        template_vmid: 9000,
        newid: 100,
        name: "hx-testclone1",
        target: "pve2",
        full: true,
        storage: "",
    };
    let upid = client.clone_vm(&request).await.unwrap();
    assert_eq!(upid.node, "pve1", "a clone runs on the template's node");
    // While it runs the new VM is locked.
    let err = client
        .request_once::<Option<String>>(Method::POST, "/nodes/pve2/qemu/100/config", &[("cores", "4".into())])
        .await
        .unwrap_err();
    assert!(err.is_lock() && err.text().contains("VM 100 is locked (clone)"), "{err:?}");
    client.follow(&upid).await.unwrap();
    client.configure("pve2", 100, &[("cores", "4".into())]).await.unwrap();
    assert_eq!(pve.vms()[0].config["cores"], "4");
    // The same id again: taken.
    let err = client.clone_vm(&request).await.unwrap_err();
    assert!(err.is_vmid_taken(), "{err:?}");
    // A failing task reads as failed with its exit status.
    pve.inject(Fault::FailTask { kind: "qmstart".into(), message: "start failed: boom".into(), count: 1 });
    let err = client.power("pve2", 100, "start", &[]).await.unwrap_err();
    assert!(matches!(&err, ProxmoxError::Task { exitstatus, .. } if exitstatus == "start failed: boom"), "{err:?}");
    // A task asked of the wrong node is not there.
    let wrong = Upid { node: "pve2".into(), ..upid };
    let err = client.follow_for(&wrong, Duration::from_secs(1)).await;
    assert!(err.is_err());
    client.destroy("pve2", 100).await.unwrap();
    assert!(pve.vms().is_empty());
}
