//! Types and protocols shared by the Hexabase node agent and the coordinator.
//!
//! - [`wire`]: length-prefixed bincode framing with a hard size cap.
//! - [`proto`]: the enrollment and link messages, protocol version and ALPN identifiers.
//! - [`report`]: the capacity report an agent sends every interval.
//! - [`spec`]: the desired state (`NodeSpec`) the coordinator pushes to each node.
//! - [`pki`]: CA pinning, certificate identities and the TLS configurations of both ends.
//! - [`host_access`]: the host cluster's ServiceAccount a `server` node mints for the coordinator.
//! - [`names`]: node pools and the name rules both sides enforce.
//! - [`config`]: TOML configuration files with `HEXA_*` environment overrides.
//! - [`signals`]: waiting for SIGINT/SIGTERM; [`clock`]: wall-clock timestamps.
//! - [`service`]: telling systemd the daemon is ready, what it is doing, and that it is alive.

pub mod clock;
pub mod config;
pub mod fsutil;
pub mod host_access;
pub mod isolation;
pub mod k3s;
pub mod logging;
pub mod names;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod pki;
pub mod proto;
pub mod quantity;
pub mod report;
pub mod service;
pub mod signals;
pub mod spec;
pub mod tenant;
pub mod wire;

/// Installs the ring rustls crypto provider for the process. Every binary and test helper calls this
/// first: with both ring and aws-lc-rs compiled in, rustls refuses to pick one on its own.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is exactly the state we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
