//! Floods of unauthenticated connections, for the tests and benchmarks of what strangers can make
//! the coordinator hold. Every peer sends only to the coordinator under test on loopback, from
//! loopback source addresses of its own (127.0.0.2 and up), and stops by itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME, CaHash};

/// What one hostile enrollment connection does once it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Sends a length prefix within the enrollment cap, then nothing: holds the connection.
    PrefixThenSilence,
    /// Sends a 1 MiB length prefix and tries to follow it with a 1 MiB body.
    HugeBody,
}

/// How a flood went, from the attacker's side.
#[derive(Debug, Default)]
pub struct FloodOutcome {
    /// Connections the coordinator let finish the handshake.
    pub admitted: AtomicUsize,
    /// Connections refused before or during the handshake.
    pub refused: AtomicUsize,
    /// Admitted connections the coordinator later closed.
    pub closed_by_coordinator: AtomicUsize,
}

/// Source addresses for `peers` connections, `per_address` from each: 127.0.0.2, 127.0.0.3, ...
pub fn sources(peers: usize, per_address: usize) -> Vec<IpAddr> {
    (0..peers)
        .map(|i| {
            let n = 2 + (i / per_address.max(1)) as u32;
            IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
        })
        .collect()
}

/// Opens `peers` enrollment connections to `addr` at once, alternating the two behaviours, and
/// keeps each until the coordinator closes it or `hold` passes. Returns when all have ended.
pub async fn enrollment_flood(addr: SocketAddr, pin: CaHash, peers: usize, hold: Duration) -> Arc<FloodOutcome> {
    let outcome = Arc::new(FloodOutcome::default());
    let mut endpoints = std::collections::BTreeMap::new();
    let mut tasks = Vec::new();
    for (i, source) in sources(peers, 25).into_iter().enumerate() {
        let endpoint = match endpoints.get(&source) {
            Some(endpoint) => endpoint,
            None => {
                let Ok(endpoint) = quinn::Endpoint::client(SocketAddr::new(source, 0)) else { continue };
                endpoints.entry(source).or_insert(endpoint)
            }
        }
        .clone();
        let behaviour = if i % 2 == 0 { Behaviour::PrefixThenSilence } else { Behaviour::HugeBody };
        let outcome = outcome.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(config) = pki::enroll_client_config(pin) else { return };
            let connecting = match endpoint.connect_with(config, addr, COORDINATOR_SERVER_NAME) {
                Ok(connecting) => connecting,
                Err(_) => return,
            };
            let conn = match tokio::time::timeout(Duration::from_secs(15), connecting).await {
                Ok(Ok(conn)) => conn,
                _ => {
                    outcome.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            outcome.admitted.fetch_add(1, Ordering::Relaxed);
            let attack = async {
                let (mut send, _recv) = conn.open_bi().await.ok()?;
                match behaviour {
                    Behaviour::PrefixThenSilence => {
                        send.write_all(&8000u32.to_be_bytes()).await.ok()?;
                        std::future::pending::<()>().await;
                    }
                    Behaviour::HugeBody => {
                        send.write_all(&(1u32 << 20).to_be_bytes()).await.ok()?;
                        let chunk = vec![0x5a; 64 * 1024];
                        for _ in 0..16 {
                            send.write_all(&chunk).await.ok()?;
                        }
                        std::future::pending::<()>().await;
                    }
                }
                Some(())
            };
            tokio::select! {
                _ = attack => {}
                _ = conn.closed() => {}
                _ = tokio::time::sleep(hold) => {}
            }
            if conn.close_reason().is_some() {
                outcome.closed_by_coordinator.fetch_add(1, Ordering::Relaxed);
            }
            conn.close(0u32.into(), b"done");
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    outcome
}

/// Opens `count` TCP connections to `addr` that each send the start of a request's headers and
/// then nothing. Returns the streams, so the caller can see when the server closes them.
pub async fn slow_header_connections(addr: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { continue };
        if stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\nX-Slow: ").await.is_ok() {
            streams.push(stream);
        }
    }
    streams
}

/// Peak resident memory (VmHWM) of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
