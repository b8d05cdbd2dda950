//! The messages of the two QUIC protocols.
//!
//! Enrollment (`hexa-enroll/1`, server-authenticated TLS only): one bidirectional stream carrying one
//! [`EnrollRequest`] and one [`EnrollResponse`].
//!
//! The link (`hexa/1`, mutual TLS): the agent opens one bidirectional control stream and sends a
//! [`Hello`]; the coordinator answers [`CoordinatorMessage::Welcome`] or
//! [`CoordinatorMessage::Refused`]. After that the agent sends [`AgentMessage`]s and the coordinator
//! [`CoordinatorMessage`]s on the same stream, each as one frame (see [`crate::wire`]).
//!
//! Both opening messages start with `protocol_version`, so a peer that cannot decode the rest can
//! still read the version and refuse with a reason a person understands.

use serde::{Deserialize, Serialize};

use crate::names::Pool;
use crate::report::CapacityReport;
use crate::spec::{AppliedStatus, NodeSpec};

/// The protocol version this build speaks. 2: isolation specs carry node addresses and node
/// services, reports carry firewall displacements (bincode is positional: a version 1 peer cannot
/// read them, so it is told the version instead). 3: reports carry isolation figures, and the
/// coordinator may ask a `server` node for host-cluster access
/// ([`CoordinatorMessage::HostAccessRequest`]).
pub const PROTOCOL_VERSION: u32 = 3;
/// ALPN of the enrollment protocol.
pub const ALPN_ENROLL: &[u8] = b"hexa-enroll/1";
/// ALPN of the node link.
pub const ALPN_LINK: &[u8] = b"hexa/1";

/// QUIC application close codes, so the closing side's reason survives into the peer's error.
pub mod close_code {
    /// Orderly shutdown.
    pub const DONE: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected message).
    pub const PROTOCOL: u32 = 1;
    /// The peer speaks a protocol version we do not.
    pub const UNSUPPORTED_VERSION: u32 = 2;
    /// The peer is not allowed in (bad token, missing or superseded certificate).
    pub const UNAUTHORIZED: u32 = 3;
    /// The coordinator failed internally.
    pub const INTERNAL: u32 = 4;
    /// The coordinator is shutting down.
    pub const SHUTDOWN: u32 = 5;
}

/// Who a node is according to the infrastructure that created it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub enum ProviderIdentity {
    /// Bare metal or anything we do not know.
    #[default]
    None,
    /// A Proxmox VE virtual machine.
    Proxmox { vmid: u32, smbios_uuid: String },
}

/// First and only message of an enrollment from the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    /// Must stay the first field: see [`crate::wire::peek_protocol_version`].
    pub protocol_version: u32,
    pub agent_version: String,
    /// The bootstrap token, `<id>.<secret>`.
    pub token: String,
    /// PKCS#10 request for the key the agent generated; only its public key is used.
    pub csr_der: Vec<u8>,
    pub hostname: String,
    pub machine_id: String,
    /// The name the operator asked for with `--node-name`; the coordinator decides.
    pub requested_name: Option<String>,
    pub provider: ProviderIdentity,
}

/// The coordinator's answer to an [`EnrollRequest`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum EnrollResponse {
    Accepted(Enrolled),
    Refused(Refusal),
    /// Sent by a coordinator that follows another: enroll with `leader` (`HOST:PORT`) instead.
    FollowLeader {
        leader: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The node name the coordinator chose; it is also the certificate's subject.
    pub node_name: String,
    pub pool: Pool,
    /// The node certificate first, then any intermediates.
    pub cert_chain_der: Vec<Vec<u8>>,
    /// The coordinator CA, which the agent pinned by hash and trusts from now on.
    pub ca_der: Vec<u8>,
}

/// Why a peer was turned away.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    UnsupportedVersion,
    MalformedRequest,
    TokenUnknown,
    TokenExpired,
    TokenUsed,
    TokenRevoked,
    CertificateRequired,
    CertificateSuperseded,
    Internal,
    /// The name belongs to an enrolled node; only a re-enrollment token for it may take it.
    NameTaken,
    /// The token is bound to another node name or provider identity than the request's.
    IdentityMismatch,
    /// The node's certificate was revoked by an operator.
    CertificateRevoked,
    /// This coordinator follows another (several share one etcd): the message names the leader
    /// when it is known. Retrying, there or at the next address, helps.
    NotLeader,
}

/// Opening message of the link.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Must stay the first field: see [`crate::wire::peek_protocol_version`].
    pub protocol_version: u32,
    pub agent_version: String,
    /// What the agent believes its name is. Informational: the certificate decides.
    pub node_name: String,
    /// Generation of the last spec the agent applied (0 when none).
    pub applied_generation: u64,
    pub system: SystemInfo,
}

/// Static facts about the node, sent once per connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemInfo {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
}

/// Everything the agent sends after its hello.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum AgentMessage {
    Report(Box<CapacityReport>),
    Applied(AppliedStatus),
    /// A CSR for a fresh key; the coordinator signs it for the connection's identity.
    RenewCertificate {
        csr_der: Vec<u8>,
    },
    /// The answer to [`CoordinatorMessage::HostAccessRequest`]: the host cluster's access, or why
    /// this node cannot mint it.
    HostAccess(Result<crate::host_access::HostAccess, String>),
}

/// Everything the coordinator sends on the link.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    Refused(Refusal),
    Spec(Box<NodeSpec>),
    /// The report with this sequence number was recorded.
    ReportAck {
        seq: u64,
    },
    CertificateRenewed {
        cert_chain_der: Vec<Vec<u8>>,
    },
    /// The renewal request was refused; the old certificate stays in use.
    RenewalRefused(Refusal),
    /// Sent to a `server` node whose K3s runs, while the coordinator has no host-cluster access:
    /// mint the coordinator's ServiceAccount ([`crate::host_access`]) and answer
    /// [`AgentMessage::HostAccess`].
    HostAccessRequest,
    /// The answer to a hello sent to a coordinator that follows another: link to `leader`
    /// (`HOST:PORT`) instead. Only a coordinator whose certificate the node's CA signed can say it.
    FollowLeader {
        leader: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The identity read from the client certificate.
    pub node_name: String,
    pub pool: Pool,
    pub report_interval_ms: u64,
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use crate::report::strategies::capacity_report;
    use crate::spec::strategies::{applied_status, node_spec};
    use proptest::prelude::*;

    pub fn refusal() -> impl Strategy<Value = Refusal> {
        (
            prop_oneof![
                Just(RefusalCode::UnsupportedVersion),
                Just(RefusalCode::TokenUsed),
                Just(RefusalCode::CertificateRequired),
                Just(RefusalCode::Internal),
                Just(RefusalCode::NotLeader),
            ],
            ".*",
        )
            .prop_map(|(code, message)| Refusal { code, message })
    }

    pub fn hello() -> impl Strategy<Value = Hello> {
        (any::<u32>(), ".*", "[a-z0-9-]{1,20}", any::<u64>(), ".*", ".*").prop_map(
            |(protocol_version, agent_version, node_name, applied_generation, hostname, kernel)| Hello {
                protocol_version,
                agent_version,
                node_name,
                applied_generation,
                system: SystemInfo { hostname, os: "linux".into(), kernel, arch: "x86_64".into() },
            },
        )
    }

    pub fn enroll_request() -> impl Strategy<Value = EnrollRequest> {
        (
            any::<u32>(),
            "[a-z0-9]{6}\\.[a-z0-9]{16}",
            proptest::collection::vec(any::<u8>(), 0..300),
            ".*",
            "[0-9a-f]{32}",
            proptest::option::of("[a-z0-9-]{1,30}"),
            prop_oneof![
                Just(ProviderIdentity::None),
                (any::<u32>(), ".*").prop_map(|(vmid, smbios_uuid)| ProviderIdentity::Proxmox { vmid, smbios_uuid }),
            ],
        )
            .prop_map(|(protocol_version, token, csr_der, hostname, machine_id, requested_name, provider)| {
                EnrollRequest {
                    protocol_version,
                    agent_version: "0.1.0".into(),
                    token,
                    csr_der,
                    hostname,
                    machine_id,
                    requested_name,
                    provider,
                }
            })
    }

    pub fn agent_message() -> impl Strategy<Value = AgentMessage> {
        prop_oneof![
            capacity_report().prop_map(|r| AgentMessage::Report(Box::new(r))),
            applied_status().prop_map(AgentMessage::Applied),
            proptest::collection::vec(any::<u8>(), 0..200)
                .prop_map(|csr_der| AgentMessage::RenewCertificate { csr_der }),
            (".*", ".*", ".*").prop_map(|(server_url, ca_pem, token)| AgentMessage::HostAccess(Ok(
                crate::host_access::HostAccess { server_url, ca_pem, token }
            ))),
            ".*".prop_map(|why| AgentMessage::HostAccess(Err(why))),
        ]
    }

    pub fn coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
        prop_oneof![
            ("[a-z0-9-]{1,20}", any::<u64>(), crate::names::strategies::pool()).prop_map(
                |(node_name, report_interval_ms, pool)| CoordinatorMessage::Welcome(Welcome {
                    node_name,
                    pool,
                    report_interval_ms
                })
            ),
            refusal().prop_map(CoordinatorMessage::Refused),
            node_spec().prop_map(|s| CoordinatorMessage::Spec(Box::new(s))),
            any::<u64>().prop_map(|seq| CoordinatorMessage::ReportAck { seq }),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..3)
                .prop_map(|cert_chain_der| CoordinatorMessage::CertificateRenewed { cert_chain_der }),
            refusal().prop_map(CoordinatorMessage::RenewalRefused),
            Just(CoordinatorMessage::HostAccessRequest),
            "[a-z0-9.:-]{1,40}".prop_map(|leader| CoordinatorMessage::FollowLeader { leader }),
        ]
    }
}
