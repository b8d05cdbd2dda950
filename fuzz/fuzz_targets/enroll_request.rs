//! Feeds arbitrary bytes to the coordinator's enrollment endpoint as an unauthenticated peer's
//! stream: the frame is read with the enrollment cap, decoded as the coordinator decodes it
//! (`link::decode_opening`), and a request that decodes goes through the real `Enroller` over a real
//! state database and CA. Holds:
//! - nothing panics, and nothing inside a frame may claim more than the enrollment cap;
//! - what decodes survives a round trip and speaks our protocol version;
//! - with the token it carries (one the peer cannot know) a request is always refused, and never
//!   as an internal failure;
//! - with a fresh valid token it is admitted under the name the request asked for (or took from its
//!   hostname), with a certificate for that name, or refused as malformed (its name or its CSR):
//!   nothing else applies to a store with no nodes and an unbound token.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hexa_coordinator::bootstrap::CertificateAuthority;
use hexa_coordinator::enroll::Enroller;
use hexa_coordinator::link::decode_opening;
use hexa_coordinator::store::{Store, StoreError, TokenState};
use hexa_coordinator::tokens::{self, TokenRequest};
use hexa_shared::names::{Pool, node_name_from_hostname, validate_node_name};
use hexa_shared::proto::{EnrollRequest, PROTOCOL_VERSION, RefusalCode};
use hexa_shared::wire::{self, MAX_ENROLL_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    enroller: Enroller,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Every input commits a few transactions: in memory when the machine has a tmpfs.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("temp dir");
        let store = Store::open(&dir.path().join("state.redb")).expect("state database");
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).expect("CA");
        let enroller = Enroller::new(store.clone(), Arc::new(ca), Duration::from_secs(3600));
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        Fixture { _dir: dir, store, enroller, runtime }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut stream = data;
    let Ok(Some(payload)) = f.runtime.block_on(wire::read_payload_within(&mut stream, MAX_ENROLL_FRAME_LEN)) else {
        return;
    };
    assert!(payload.len() <= MAX_ENROLL_FRAME_LEN);
    let req = match decode_opening::<EnrollRequest, MAX_ENROLL_FRAME_LEN>(&payload) {
        Ok(req) => req,
        Err((_, refusal, _)) => {
            assert!(
                matches!(refusal.code, RefusalCode::MalformedRequest | RefusalCode::UnsupportedVersion),
                "{refusal}"
            );
            return;
        }
    };
    assert_eq!(req.protocol_version, PROTOCOL_VERSION);
    let frame = wire::encode_frame(&req).expect("a decoded request encodes");
    let again = decode_opening::<EnrollRequest, MAX_ENROLL_FRAME_LEN>(&frame[4..]).expect("its encoding decodes");
    assert_eq!(again, req, "round trip changed the request");

    // As sent: the peer cannot know the secret of any token in the store.
    let refused = f.enroller.enroll(&req).expect_err("admitted without a valid token");
    assert!(matches!(refused.code, RefusalCode::TokenUnknown | RefusalCode::MalformedRequest), "{refused}");

    // As a node holding a valid bootstrap token would send it.
    let ttl = Duration::from_secs(600);
    let created = tokens::create(
        &f.store,
        TokenRequest { pool: Pool::Shared, ttl, description: String::new(), node_class: None },
        &[],
    )
    .expect("token");
    let authorised = EnrollRequest { token: created.token.clone(), ..req.clone() };
    let outcome = f.enroller.enroll(&authorised);
    let node = match outcome {
        Ok(admitted) => {
            let name = admitted.record.name.clone();
            validate_node_name(&name).expect("admitted under a valid node name");
            let expected = match &req.requested_name {
                Some(asked) => asked.clone(),
                None => node_name_from_hostname(&req.hostname).unwrap_or_else(|| "node".to_string()),
            };
            assert_eq!(name, expected, "no node is enrolled, so the name asked for is free");
            assert_eq!(admitted.enrolled.node_name, name);
            let cert = admitted.enrolled.cert_chain_der.first().expect("a certificate");
            let identity = hexa_shared::pki::cert_identity(cert).expect("the issued certificate parses");
            assert_eq!(identity.common_name, name, "the certificate names the node");
            assert_eq!(identity.serial, admitted.record.cert_serial);
            let token = f.store.tokens().expect("tokens").remove(&created.id).expect("token kept");
            assert!(matches!(token.state, TokenState::Used { .. }), "the token was consumed");
            Some(name)
        }
        Err(refusal) => {
            assert_eq!(refusal.code, RefusalCode::MalformedRequest, "{refusal}");
            let token = f.store.tokens().expect("tokens").remove(&created.id).expect("token kept");
            assert_eq!(token.state, TokenState::Active, "a refused request leaves its token usable");
            None
        }
    };
    // Back to an empty store, so that every input meets the same state.
    f.store
        .write::<_, StoreError>(|tx| {
            if let Some(node) = &node {
                tx.remove_node(node)?;
            }
            tx.remove_token(&created.id)
        })
        .expect("cleanup");
});
