//! Everything the coordinator must refuse, each with a reason in its log, while a healthy node
//! keeps reporting through all of it. Runs the real `hexa-coordinator` binary so that the log
//! checked is the one an operator reads.

use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_shared::pki::{self, CaHash};
use hexa_shared::proto::{CoordinatorMessage, EnrollResponse, PROTOCOL_VERSION, RefusalCode};
use hexa_shared::wire::{self, MAX_FRAME_LEN};
use hexa_tests::admin::metric;
use hexa_tests::procs::CoordinatorProc;
use hexa_tests::{eventually, free_port, inproc, raw};

use raw::refusal_of;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_with_reasons_while_others_are_served() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::start(dir.path(), free_port(), free_port(), "coordinator.log").await;
    let (addr, pin, admin) = (c.quic_addr, c.ca_hash, &c.admin);

    // A healthy node that must keep being served throughout.
    let good_token = admin.token("shared", "10m").await;
    let good = inproc::Agent::spawn(hexa_agent::config::AgentConfig {
        coordinator: addr.to_string(),
        token: good_token,
        ca_hash: pin.to_string(),
        state_dir: dir.path().join("good"),
        node_name: "good".into(),
        ephemeral_path: dir.path().to_path_buf(),
        ..Default::default()
    });
    let seq_before = eventually(Duration::from_secs(20), "good node Ready", async || {
        admin.node("good").await.filter(|n| n.health == Health::Ready).and_then(|n| n.last_report_seq)
    })
    .await;

    // 1. A token used twice.
    let token = admin.token("shared", "10m").await;
    let creds = raw::enroll_node(addr, pin, &token, "once").await;
    let (code, message) = refusal_of(raw::enroll(addr, pin, &raw::enroll_request(&token, "twice").1).await);
    assert_eq!(code, RefusalCode::TokenUsed);
    assert!(message.contains("already used by node once"), "{message}");

    // 2. An expired token.
    let expired = admin.token("shared", "1s").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, message) = refusal_of(raw::enroll(addr, pin, &raw::enroll_request(&expired, "late").1).await);
    assert_eq!(code, RefusalCode::TokenExpired, "{message}");

    // 3. A revoked token.
    let revoked = admin.token("shared", "10m").await;
    let id = revoked.split('.').next().unwrap();
    let (status, _) = admin.request(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(status, 200);
    let (code, _) = refusal_of(raw::enroll(addr, pin, &raw::enroll_request(&revoked, "revoked").1).await);
    assert_eq!(code, RefusalCode::TokenRevoked);
    // A made-up token with a real id shape.
    let (code, _) =
        refusal_of(raw::enroll(addr, pin, &raw::enroll_request(&format!("{id}.0000000000000000"), "x").1).await);
    assert_eq!(code, RefusalCode::TokenUnknown);

    // 4. A wrong CA pin: the agent refuses the coordinator before sending its token.
    let unused = admin.token("shared", "10m").await;
    let wrong_pin = CaHash::of(b"some other CA");
    let err = raw::enroll(addr, wrong_pin, &raw::enroll_request(&unused, "pinned").1).await.unwrap_err();
    assert!(err.contains("CA pin mismatch") && err.contains(&pin.to_string()), "{err}");

    // 5. A client certificate from another CA, named like a real node.
    let (cert, key) = raw::foreign_client_cert("good");
    let foreign = pki::link_client_config(&creds.ca, vec![cert], key).unwrap();
    let refused = raw::refused_link(addr, foreign).await;
    assert!(refused.contains("alert") || refused.contains("certificate"), "{refused}");

    // 6. hexa/1 without a client certificate.
    let anonymous = pki::anonymous_link_client_config(&creds.ca).unwrap();
    let reason = raw::refused_link(addr, anonymous).await;
    assert!(reason.contains("client certificate is required"), "{reason}");

    // 7. A frame over the cap.
    let mut link = raw::open_link(addr, creds.link_config()).await.unwrap();
    link.send_bytes(&((MAX_FRAME_LEN as u32 + 1).to_be_bytes())).await;
    let reason = link.closed_reason().await;
    assert!(reason.contains("exceeds the 1048576-byte cap"), "{reason}");

    // 8. A frame with trailing bytes.
    let mut link = raw::open_link(addr, creds.link_config()).await.unwrap();
    let mut payload = wire::encode_frame(&raw::hello("once", PROTOCOL_VERSION)).unwrap().split_off(4);
    payload.extend_from_slice(b"extra");
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    link.send_bytes(&frame).await;
    let reason = match link.recv::<CoordinatorMessage>().await {
        Some(CoordinatorMessage::Refused(r)) => r.message,
        other => panic!("expected a refusal frame, got {other:?}"),
    };
    assert!(reason.contains("5 bytes after"), "{reason}");

    // 9. Garbage bytes, on the link and on enrollment.
    let mut link = raw::open_link(addr, creds.link_config()).await.unwrap();
    link.send_bytes(&[0, 0, 0, 8, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8]).await;
    let reason = link.closed_reason().await;
    assert!(reason.contains("malformed frame"), "{reason}");
    let answer = raw::enroll_bytes(addr, pin, b"\x00\x00\x00\x04junk").await;
    assert!(matches!(answer, Ok(EnrollResponse::Refused(_))), "{answer:?}");

    // 10. An unknown protocol version.
    let mut link = raw::open_link(addr, creds.link_config()).await.unwrap();
    link.send(&raw::hello("once", 99)).await;
    match link.recv::<CoordinatorMessage>().await {
        Some(CoordinatorMessage::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::UnsupportedVersion);
            assert!(
                r.message.contains("version 99") && r.message.contains(&format!("speaks version {PROTOCOL_VERSION}")),
                "{}",
                r.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (mut req, _) = (raw::enroll_request(&unused, "future").1, ());
    req.protocol_version = 7;
    let (code, _) = refusal_of(raw::enroll(addr, pin, &req).await);
    assert_eq!(code, RefusalCode::UnsupportedVersion);

    // Through all of that the good node kept reporting, and enrollment still works.
    eventually(Duration::from_secs(10), "good node still reporting", async || {
        admin.node("good").await.filter(|n| n.health == Health::Ready && n.last_report_seq > Some(seq_before + 3))
    })
    .await;
    raw::enroll_node(addr, pin, &admin.token("shared", "10m").await, "after").await;

    // Every refusal is counted and has a line in the coordinator's log that says why.
    let metrics = admin.metrics().await;
    for reason in [
        "tokenused",
        "tokenexpired",
        "tokenrevoked",
        "tokenunknown",
        "certificate_required",
        "frame_too_large",
        "trailing_bytes",
        "malformed_frame",
        "unsupported_version",
    ] {
        assert!(metric(&metrics, &format!("hexa_refusals_total{{reason=\"{reason}\"}}")) >= 1, "{reason}\n{metrics}");
    }
    assert!(metric(&metrics, "hexa_handshake_failures_total") >= 1, "foreign certificate\n{metrics}");
    let log = c.proc.log_text();
    for needle in [
        "already used by node once",
        "TokenExpired",
        "was revoked",
        "handshake refused",
        "client certificate is required",
        "exceeds the 1048576-byte cap",
        "bytes after its",
        "malformed frame",
        "protocol version 99 is not supported",
    ] {
        assert!(log.contains(needle), "coordinator log lacks {needle:?}:\n{log}");
    }
    good.stop().await;
}
