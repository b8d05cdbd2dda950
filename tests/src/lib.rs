//! Test doubles and harnesses for the node plane's end-to-end tests and benchmarks.
//!
//! - [`procs`]: the real binaries as child processes (killable with SIGKILL), with logs in files.
//! - [`inproc`]: coordinator and agents inside the test process, on loopback.
//! - [`raw`]: hand-driven QUIC peers that misbehave on purpose.
//! - [`admin`]: a small client for the admin API.
//! - [`sim`]: a fleet of simulated agents, each a real QUIC connection with its own certificate.

pub mod admin;
pub mod artifacts;
pub mod burst;
pub mod dedicated;
pub mod etcd;
pub mod fake_kube;
pub mod hostile;
pub mod ingest_bench;
pub mod inproc;
pub mod k3s_supervisor;
pub mod netns;
pub mod procs;
pub mod pve;
pub mod pve_bench;
pub mod raw;
pub mod sim;
pub mod trust_bench;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Installs the ring provider; every test calls this first.
pub fn init() {
    hexa_shared::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Path of one of the workspace's binaries, built beside the test executables.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs from target/<profile>/deps/<test>, a bench binary from target/<profile>/<bin>;
    // either way the binaries are in target/<profile>.
    let parent = exe.parent().map(PathBuf::from).unwrap_or_default();
    let dir = if parent.ends_with("deps") { parent.parent().map(PathBuf::from).unwrap_or_default() } else { parent };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some` or `within` runs out.
pub async fn eventually<T>(within: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (UDP and TCP both free at the time of asking).
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port on loopback");
        let port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
