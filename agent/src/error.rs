//! The agent's top-level error: what ends `hexa_agent::run` or an enrollment attempt.
//!
//! Every variant either is its cause (`transparent`) or says what failed in its own words with the
//! cause's text in the message, and then does not also return the cause as its `source`: an error
//! chain printed by `anyhow` (`{:#}`, or `Caused by:`) names each cause once.

use std::path::PathBuf;

use hexa_shared::pki::PkiError;
use hexa_shared::proto::Refusal;
use hexa_shared::wire::FrameError;

use crate::k3s::FetchError;
use crate::node::SupervisorStopped;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot reach the coordinator: {0}")]
    Connect(ConnectError),
    #[error("protocol error: {0}")]
    Frame(FrameError),
    #[error("the coordinator refused this node: {0}")]
    Refused(Refusal),
    /// An enrollment sent to a coordinator that follows another: it named the leader, or says why
    /// it cannot (then the next address may lead).
    #[error("the coordinator follows another: {message}")]
    NotLeader { leader: Option<String>, message: String },
    #[error("key generation: {0}")]
    Crypto(rcgen::Error),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    SupervisorStopped(#[from] SupervisorStopped),
}

impl From<ConfigError> for AgentError {
    fn from(error: ConfigError) -> Self {
        AgentError::Config(error)
    }
}

impl From<ConnectError> for AgentError {
    fn from(error: ConnectError) -> Self {
        AgentError::Connect(error)
    }
}

impl From<FrameError> for AgentError {
    fn from(error: FrameError) -> Self {
        AgentError::Frame(error)
    }
}

/// What in the agent's configuration (or the machine it runs on) keeps it from starting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("coordinator address {address:?}: {error} (expected HOST:PORT)")]
    Address { address: String, error: std::io::Error },
    #[error("coordinator address {address:?} resolves to nothing")]
    Unresolved { address: String },
    #[error(
        "this node is not enrolled (no certificate in {}) and no bootstrap token and CA hash were given: \
         pass --token-file (or --token) and --ca-hash (from `hexactl token create` and the coordinator's \
         start-up output)",
        state_dir.display()
    )]
    NotEnrolled { state_dir: PathBuf },
    #[error("{0}")]
    TokenFile(crate::config::TokenFileError),
    /// The K3s installer cannot be set up on this machine (architecture, HTTP client).
    #[error("{0}")]
    Installer(FetchError),
    #[error("[isolation] baseline_pod_cidr: {0}; set the cluster's pod network, e.g. 10.42.0.0/16")]
    BaselinePodCidr(String),
    /// `proxmox_vmid` is set but the machine's SMBIOS uuid cannot be read.
    #[error(
        "proxmox_vmid is {vmid} but the SMBIOS uuid {} is unreadable ({error}): is this a Proxmox VM, and is \
         the agent running as root?",
        path.display()
    )]
    ProviderIdentity { vmid: u32, path: PathBuf, error: String },
}

/// Why a connection to the coordinator could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Connect(quinn::ConnectError),
    #[error("{0}")]
    Connection(quinn::ConnectionError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named_once() {
        let error = AgentError::from(FrameError::Truncated { got: 1, want: 4 });
        let printed = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(printed, "protocol error: stream ended inside a frame (1 of 4 bytes)");
    }
}
