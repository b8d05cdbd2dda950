//! Framing: every message is a big-endian `u32` length followed by that many bytes of bincode.
//!
//! Reads are bounded twice: the length is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated, and the decoder runs with the same limit so a length field inside the message cannot
//! ask for more. A decode that leaves bytes unread is an error, so two peers never silently disagree
//! on a message's shape.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Largest frame payload either side accepts on the link (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest enrollment request the coordinator reads (16 KiB). An enrollment is a token, a CSR, a
/// hostname and a few identifiers, well under 2 KiB; anyone may open an enrollment connection, so
/// what one costs before it is authenticated must stay this small.
pub const MAX_ENROLL_FRAME_LEN: usize = 16 << 10;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error("frame holds {extra} bytes after its {consumed}-byte message")]
    TrailingBytes { consumed: usize, extra: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame: length prefix plus payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config())?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let mut frame = Vec::with_capacity(4 + payload.len());
    // The cap above keeps the length within u32.
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes one frame payload (without its length prefix); the message must use every byte.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    decode_payload_within::<T, MAX_FRAME_LEN>(payload)
}

/// [`decode_payload`] with a tighter cap: nothing inside the message may claim more than `LIMIT`
/// bytes either, so a small frame cannot ask for a large allocation.
pub fn decode_payload_within<T: DeserializeOwned, const LIMIT: usize>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > LIMIT {
        return Err(FrameError::TooLarge { len: payload.len(), max: LIMIT });
    }
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (msg, consumed) = bincode::serde::decode_from_slice(payload, config)?;
    if consumed != payload.len() {
        return Err(FrameError::TrailingBytes { consumed, extra: payload.len() - consumed });
    }
    Ok(msg)
}

/// Reads the protocol version that opens every hello-type message, without requiring the rest to
/// decode: a peer speaking another version can still be told which versions we speak.
pub fn peek_protocol_version(payload: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(payload, bincode_config()).ok().map(|(version, _)| version)
}

/// Reads one frame's payload. `Ok(None)` is a clean end of stream at a frame boundary.
pub async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    read_payload_within(reader, MAX_FRAME_LEN).await
}

/// [`read_payload`] for frames of at most `max` bytes: a longer length prefix is refused before
/// anything is allocated for it.
pub async fn read_payload_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < len_buf.len() {
        let n = reader.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Truncated { got, want: len_buf.len() }) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, want: len });
        }
        got += n;
    }
    Ok(Some(payload))
}

/// Reads and decodes one frame. `Ok(None)` is a clean end of stream.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<T>, FrameError> {
    match read_payload(reader).await? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(writer: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Frames [`spawn_reader`] reads ahead of the one being handled.
const READ_AHEAD: usize = 16;

/// Reads frames of `T` from `recv` in a task of its own and passes them on in order. A `select!`
/// over `read_frame` would drop a half-read frame whenever another branch won, and the stream would
/// lose its framing; a channel's `recv` loses nothing. The channel ends after a clean end of stream,
/// or after the first error, which is passed on. The task stops when the guard is dropped.
pub fn spawn_reader<T, R>(mut recv: R) -> (mpsc::Receiver<Result<T, FrameError>>, AbortOnDrop)
where
    T: DeserializeOwned + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let task = tokio::spawn(async move {
        while let Some(msg) = read_frame::<T, _>(&mut recv).await.transpose() {
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                break;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

/// Aborts its task when dropped, so a task reading for a connection ends with it on every path out.
#[derive(Debug)]
pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentMessage, CoordinatorMessage, EnrollRequest, Hello};
    use proptest::prelude::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
        let frame = encode_frame(msg).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: T = decode_payload(&frame[4..]).unwrap();
        assert_eq!(&back, msg);
    }

    proptest! {
        #[test]
        fn agent_messages_round_trip(msg in crate::proto::strategies::agent_message()) {
            round_trip::<AgentMessage>(&msg);
        }

        #[test]
        fn coordinator_messages_round_trip(msg in crate::proto::strategies::coordinator_message()) {
            round_trip::<CoordinatorMessage>(&msg);
        }

        #[test]
        fn hellos_round_trip_and_expose_their_version(hello in crate::proto::strategies::hello()) {
            round_trip::<Hello>(&hello);
            let frame = encode_frame(&hello).unwrap();
            prop_assert_eq!(peek_protocol_version(&frame[4..]), Some(hello.protocol_version));
        }

        #[test]
        fn enroll_requests_round_trip(req in crate::proto::strategies::enroll_request()) {
            round_trip::<EnrollRequest>(&req);
        }

        #[test]
        fn trailing_bytes_are_refused(hello in crate::proto::strategies::hello(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
            let mut payload = encode_frame(&hello).unwrap().split_off(4);
            payload.extend_from_slice(&extra);
            let err = decode_payload::<Hello>(&payload).unwrap_err();
            prop_assert!(matches!(err, FrameError::TrailingBytes { extra: e, .. } if e == extra.len()), "{err}");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload::<AgentMessage>(&bytes);
            let _ = decode_payload::<CoordinatorMessage>(&bytes);
            let _ = decode_payload::<EnrollRequest>(&bytes);
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let mut data: &[u8] = &((MAX_FRAME_LEN as u32) + 1).to_be_bytes();
        let err = read_payload(&mut data).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME_LEN + 1), "{err}");
    }

    #[tokio::test]
    async fn a_length_claiming_four_gibibytes_is_refused() {
        let mut data: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(read_payload(&mut data).await, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn truncated_frames_and_clean_ends_are_told_apart() {
        let mut empty: &[u8] = &[];
        assert!(read_payload(&mut empty).await.unwrap().is_none());
        let mut half_prefix: &[u8] = &[0, 0];
        assert!(matches!(read_payload(&mut half_prefix).await, Err(FrameError::Truncated { got: 2, want: 4 })));
        let mut short_body: &[u8] = &[0, 0, 0, 8, 1, 2, 3];
        assert!(matches!(read_payload(&mut short_body).await, Err(FrameError::Truncated { got: 3, want: 8 })));
    }

    #[tokio::test]
    async fn frames_stream_back_to_back() {
        let a = AgentMessage::RenewCertificate { csr_der: vec![1, 2, 3] };
        let b = AgentMessage::RenewCertificate { csr_der: vec![4; 100] };
        let mut buf = Vec::new();
        write_frame(&mut buf, &a).await.unwrap();
        write_frame(&mut buf, &b).await.unwrap();
        let mut reader: &[u8] = &buf;
        assert_eq!(read_frame::<AgentMessage, _>(&mut reader).await.unwrap(), Some(a));
        assert_eq!(read_frame::<AgentMessage, _>(&mut reader).await.unwrap(), Some(b));
        assert_eq!(read_frame::<AgentMessage, _>(&mut reader).await.unwrap(), None);
    }

    #[test]
    fn a_message_over_the_cap_is_not_encoded() {
        let msg = AgentMessage::RenewCertificate { csr_der: vec![0; MAX_FRAME_LEN + 1] };
        assert!(matches!(encode_frame(&msg), Err(FrameError::Encode(_) | FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn the_reader_passes_frames_on_in_order_and_ends_with_the_stream() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let (mut frames, _guard) = spawn_reader::<AgentMessage, _>(rx);
        let sent: Vec<AgentMessage> =
            (0..5u8).map(|i| AgentMessage::RenewCertificate { csr_der: vec![i; 40 * usize::from(i)] }).collect();
        for msg in &sent {
            write_frame(&mut tx, msg).await.unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(msg) = frames.recv().await {
            got.push(msg.unwrap());
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn the_reader_passes_the_first_error_on_and_stops() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let (mut frames, _guard) = spawn_reader::<AgentMessage, _>(rx);
        tx.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes()).await.unwrap();
        assert!(matches!(frames.recv().await, Some(Err(FrameError::TooLarge { .. }))));
        assert!(frames.recv().await.is_none(), "nothing is read after an error");
    }

    #[tokio::test]
    async fn dropping_the_guard_stops_the_reader() {
        let (tx, rx) = tokio::io::duplex(64);
        let (mut frames, guard) = spawn_reader::<AgentMessage, _>(rx);
        drop(guard);
        // The aborted task drops its sender: the channel ends although the stream is still open.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), frames.recv()).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
        drop(tx);
    }
}
