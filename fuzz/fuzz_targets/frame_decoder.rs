//! Feeds arbitrary bytes to the frame reader and the decoders of every message type. The decoder
//! must never panic or allocate past the frame cap, and whatever it accepts must survive a round
//! trip: its canonical encoding decodes to a message with that same encoding.
#![no_main]

use std::sync::OnceLock;

use hexa_shared::proto::{AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Hello};
use hexa_shared::wire;
use libfuzzer_sys::fuzz_target;

fn check<T: serde::Serialize + serde::de::DeserializeOwned>(payload: &[u8]) {
    if let Ok(msg) = wire::decode_payload::<T>(payload) {
        let frame = wire::encode_frame(&msg).expect("a decoded message encodes");
        let again = wire::decode_payload::<T>(&frame[4..]).expect("a canonical encoding decodes");
        let frame_again = wire::encode_frame(&again).expect("encodes");
        assert_eq!(frame, frame_again, "round trip changed the message");
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    runtime().block_on(async {
        while let Ok(Some(payload)) = wire::read_payload(&mut reader).await {
            assert!(payload.len() <= wire::MAX_FRAME_LEN);
            check::<Hello>(&payload);
            check::<EnrollRequest>(&payload);
            check::<EnrollResponse>(&payload);
            check::<AgentMessage>(&payload);
            check::<CoordinatorMessage>(&payload);
            let _ = wire::peek_protocol_version(&payload);
        }
    });
});
