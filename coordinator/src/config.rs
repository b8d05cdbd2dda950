//! `/etc/hexabase/coordinator.toml`. Every key is optional; `HEXA_<KEY>` overrides a key from the
//! environment; command-line flags override both. `packaging/coordinator.toml` documents each key
//! and a test keeps it in step with this struct.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use hexa_shared::isolation::Ipv4Cidr;
use hexa_shared::logging::LogFormat;

use crate::placement::PlacementConfig;

pub mod error;
pub use error::ConfigError;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/hexabase/coordinator.toml";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where the CA, the admin token and the state database live.
    pub state_dir: PathBuf,
    /// UDP address agents connect to (QUIC).
    pub quic_listen: SocketAddr,
    /// TCP address of the admin HTTP API.
    pub admin_listen: SocketAddr,
    /// With several coordinators on one etcd: the name or IP address of this machine at which
    /// agents and the other coordinators reach its listeners, given to them while this one leads.
    /// Empty: a listener's own address, or this machine's hostname for one on every address.
    pub advertise_address: String,
    /// How often agents report.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// A node with no report for this long is Unreachable.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// A node with no report for this long is Lost.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
    /// Lifetime of node certificates; agents renew after two thirds of it.
    #[serde(with = "humantime_serde")]
    pub node_cert_validity: Duration,
    /// Lifetime of a bootstrap token when `token create` gives none.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Overcommit, headroom and the dedicated node classes.
    pub placement: PlacementConfig,
    /// K3s on the nodes: whether agents install it, which version, from where.
    pub k3s: K3sSettings,
    /// The tenants' objects on the host K3s cluster.
    pub hostcluster: crate::hostcluster::render::RenderSettings,
    /// Tenant isolation the nodes enforce (firewall).
    pub isolation: IsolationSettings,
    /// Where the coordinator keeps its state: the redb file in `state_dir`, or etcd.
    pub store: crate::store::StoreSettings,
    /// Bounds on connections that have not authenticated yet.
    pub admission: crate::link::AdmissionLimits,
    /// Dedicated nodes as Proxmox VE VMs; absent: dedicated tenants wait for nodes enrolled by hand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<crate::proxmox::ProxmoxSettings>,
}

/// What the coordinator asks shared and dedicated nodes to enforce between tenants.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationSettings {
    /// Send nodes an isolation spec (their firewall then keeps tenants' pods apart).
    pub enabled: bool,
    /// The cluster's pod CIDR (K3s' default is 10.42.0.0/16).
    pub pod_cidr: String,
    /// Networks pods must never reach: Proxmox API, coordinator, BMCs.
    pub management_cidrs: Vec<String>,
    /// Pids a tenant may run per pod of its quota: part of every allocation the coordinator sends
    /// (`desired::AllocationPlan`), whether or not isolation specs are sent.
    pub pids_per_pod: u64,
    /// The Kubernetes API port of server nodes: the one node port every pod may reach (vCluster's
    /// syncer needs it).
    pub kube_api_port: u16,
    /// The kubelet's port on every node, which system pods (the metrics server) may reach and
    /// tenant pods may not; 0 closes it to system pods too.
    pub kubelet_port: u16,
}

impl Default for IsolationSettings {
    fn default() -> Self {
        IsolationSettings {
            enabled: true,
            pod_cidr: "10.42.0.0/16".into(),
            management_cidrs: Vec::new(),
            pids_per_pod: 1024,
            kube_api_port: 6443,
            kubelet_port: 10250,
        }
    }
}

impl IsolationSettings {
    /// `isolation.pod_cidr`, parsed.
    pub fn pod_cidr(&self) -> Result<Ipv4Cidr, ConfigError> {
        parse_cidr("isolation.pod_cidr", &self.pod_cidr)
    }

    /// `isolation.management_cidrs`, parsed.
    pub fn management_cidrs(&self) -> Result<Vec<Ipv4Cidr>, ConfigError> {
        self.management_cidrs.iter().map(|c| parse_cidr("isolation.management_cidrs", c)).collect()
    }

    /// Checks what [`pod_cidr`](Self::pod_cidr) and [`management_cidrs`](Self::management_cidrs)
    /// parse, when isolation is on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled {
            self.pod_cidr()?;
            self.management_cidrs()?;
        }
        // Every tenant pod's pids.max comes from it, isolation or not: 0 would stop every pod.
        if self.pids_per_pod == 0 {
            return Err(ConfigError::Zero { key: "isolation.pids_per_pod" });
        }
        Ok(())
    }
}

fn parse_cidr(key: &'static str, text: &str) -> Result<Ipv4Cidr, ConfigError> {
    text.parse().map_err(|reason| ConfigError::Cidr { key, value: text.to_string(), reason })
}

/// How the coordinator has agents run K3s. Roles follow pools: nodes of the `server` pool run the
/// K3s server (the first one enrolled initialises the cluster), every other node a K3s agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct K3sSettings {
    /// Install and run K3s on the nodes. Off: agents leave K3s alone.
    pub manage: bool,
    /// K3s release, e.g. `v1.35.5+k3s1`.
    pub version: String,
    /// Where agents download K3s: a server laid out like K3s' GitHub releases.
    pub artifact_base: String,
    /// sha256 (hex) of the K3s binary for the nodes' architecture, pinned by the operator. Agents
    /// check the download against it instead of the release's checksum file. Required when
    /// `artifact_base` is plain `http://`, where both files could be swapped in transit.
    pub sha256: String,
    /// A directory present on every node with the release files, instead of downloading.
    pub airgap_dir: String,
    /// The URL K3s agents and joining servers use, `https://HOST:6443`. Empty: the address the
    /// first server connects to the coordinator from.
    pub server_url: String,
    /// Extra kubelet flags (without leading dashes), e.g. reservations and eviction thresholds.
    pub kubelet_args: std::collections::BTreeMap<String, String>,
}

impl K3sSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Accepted in either case, as operators copy it; agents get it in lowercase.
        if !self.sha256.is_empty() && !hexa_shared::k3s::is_sha256_hex(&self.sha256.to_ascii_lowercase()) {
            return Err(ConfigError::NotSha256 { key: "k3s.sha256", value: self.sha256.clone() });
        }
        let plain_http = self.artifact_base.starts_with("http://");
        if self.manage && self.airgap_dir.is_empty() && plain_http && self.sha256.is_empty() {
            return Err(ConfigError::UnpinnedPlainHttp { key: "k3s.artifact_base", value: self.artifact_base.clone() });
        }
        Ok(())
    }

    /// Where agents take the release from, as their specs say it.
    pub fn artifact_source(&self) -> hexa_shared::k3s::ArtifactSource {
        use hexa_shared::k3s::ArtifactSource;
        if self.airgap_dir.is_empty() {
            let sha256 = (!self.sha256.is_empty()).then(|| self.sha256.to_ascii_lowercase());
            ArtifactSource::Url { base: self.artifact_base.clone(), sha256 }
        } else {
            ArtifactSource::AirGap { dir: self.airgap_dir.clone().into() }
        }
    }
}

impl Default for K3sSettings {
    fn default() -> Self {
        K3sSettings {
            manage: true,
            version: hexa_shared::k3s::DEFAULT_VERSION.to_string(),
            artifact_base: hexa_shared::k3s::DEFAULT_RELEASE_BASE.to_string(),
            sha256: String::new(),
            airgap_dir: String::new(),
            server_url: String::new(),
            kubelet_args: [
                ("system-reserved", "cpu=250m,memory=512Mi"),
                ("kube-reserved", "cpu=250m,memory=512Mi"),
                ("eviction-hard", "memory.available<100Mi"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            state_dir: PathBuf::from("/var/lib/hexabase/coordinator"),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            advertise_address: String::new(),
            report_interval: Duration::from_secs(1),
            unreachable_after: Duration::from_secs(3),
            lost_after: Duration::from_secs(30),
            node_cert_validity: Duration::from_secs(30 * 24 * 3600),
            token_ttl: Duration::from_secs(3600),
            log_format: LogFormat::Text,
            placement: PlacementConfig::default(),
            k3s: K3sSettings::default(),
            hostcluster: crate::hostcluster::render::RenderSettings::default(),
            isolation: IsolationSettings::default(),
            store: crate::store::StoreSettings::default(),
            admission: crate::link::AdmissionLimits::default(),
            proxmox: None,
        }
    }
}

impl CoordinatorConfig {
    /// Where agents and other coordinators reach this one's listener on `listen`: `HOST:PORT` with
    /// `advertise_address`, else the listener's own address, else (a listener on every address)
    /// this machine's hostname.
    pub fn advertised(&self, listen: SocketAddr) -> String {
        let host = if !self.advertise_address.is_empty() {
            self.advertise_address.clone()
        } else if !listen.ip().is_unspecified() {
            listen.ip().to_string()
        } else {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into())
        };
        if host.contains(':') { format!("[{host}]:{}", listen.port()) } else { format!("{host}:{}", listen.port()) }
    }

    /// Checks the relations between keys that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.report_interval.is_zero() {
            return Err(ConfigError::Zero { key: "report_interval" });
        }
        let longer = |key, value: Duration, shorter, shorter_value: Duration| {
            if value <= shorter_value {
                return Err(ConfigError::NotLonger { key, value, shorter, shorter_value });
            }
            Ok(())
        };
        longer("unreachable_after", self.unreachable_after, "report_interval", self.report_interval)?;
        longer("lost_after", self.lost_after, "unreachable_after", self.unreachable_after)?;
        let min_validity = Duration::from_secs(10);
        if self.node_cert_validity < min_validity {
            return Err(ConfigError::TooShort {
                key: "node_cert_validity",
                value: self.node_cert_validity,
                min: min_validity,
            });
        }
        self.k3s.validate()?;
        self.placement.validate()?;
        self.hostcluster.validate()?;
        self.isolation.validate()?;
        self.store.validate()?;
        self.admission.validate()?;
        let advertised = &self.advertise_address;
        if advertised.len() > 253 || advertised.chars().any(|c| c.is_whitespace() || "/@[]".contains(c)) {
            return Err(ConfigError::Invalid {
                key: "advertise_address",
                message: format!("{advertised:?} is not a host name or an IP address (no port, no brackets)"),
            });
        }
        if let Some(proxmox) = &self.proxmox {
            proxmox.validate(&self.placement.node_classes)?;
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and that the files the configuration names can be read: what
    /// `hexa-coordinator check-config` and a start check before anything else.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()?;
        self.store.check()?;
        let kubeconfig = &self.hostcluster.kubeconfig;
        if self.hostcluster.mode == crate::hostcluster::render::Mode::Apply && !kubeconfig.is_empty() {
            std::fs::File::open(kubeconfig).map_err(|error| ConfigError::Unreadable {
                key: "hostcluster.kubeconfig",
                path: kubeconfig.clone(),
                error: error.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packaged() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/coordinator.toml")
    }

    #[test]
    fn the_packaged_file_documents_every_key_with_its_default() {
        let loaded: CoordinatorConfig = hexa_shared::config::load(Some(&packaged()), "/x".as_ref(), []).unwrap();
        assert_eq!(loaded, CoordinatorConfig::default());
        let text = std::fs::read_to_string(packaged()).unwrap();
        let keys = toml::Table::try_from(CoordinatorConfig::default()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let documented = |prefix: &str| {
            let line = lines.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} missing"));
            assert!(line > 0 && lines[line - 1].starts_with('#'), "{prefix} has no comment above it");
        };
        for (key, value) in &keys {
            match value {
                toml::Value::Table(section) => {
                    documented(&format!("[{key}]"));
                    for (sub, value) in section {
                        match value {
                            // An array of tables is written [[key.sub]]; a plain list, sub = [...].
                            toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
                                documented(&format!("[[{key}.{sub}]]"))
                            }
                            _ => documented(&format!("{sub} =")),
                        }
                    }
                }
                _ => documented(&format!("{key} =")),
            }
        }
        assert!(CoordinatorConfig::default().validate().is_ok());
    }

    #[test]
    fn k3s_over_plain_http_needs_a_pinned_checksum() {
        let http = |sha256: &str| CoordinatorConfig {
            k3s: K3sSettings {
                artifact_base: "http://mirror.internal/k3s".into(),
                sha256: sha256.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = http("").validate().unwrap_err();
        let err = err.to_string();
        assert!(err.contains("plain http") && err.contains("k3s.sha256"), "{err}");
        assert!(http(&"ab".repeat(32)).validate().is_ok());
        assert!(http("abc").validate().unwrap_err().to_string().contains("not a sha256"));
        let pinned = http(&"AB".repeat(32)).k3s.artifact_source();
        assert_eq!(
            pinned,
            hexa_shared::k3s::ArtifactSource::Url {
                base: "http://mirror.internal/k3s".into(),
                sha256: Some("ab".repeat(32))
            }
        );
        // Not managing K3s, or installing from a directory, downloads nothing.
        let mut unmanaged = http("");
        unmanaged.k3s.manage = false;
        assert!(unmanaged.validate().is_ok());
    }

    #[test]
    fn inconsistent_thresholds_are_explained() {
        let config = CoordinatorConfig { lost_after: Duration::from_secs(2), ..Default::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("lost_after (2s) must be longer than unreachable_after (3s)"), "{err}");
    }

    #[test]
    fn errors_name_the_key_and_its_value() {
        let table: [(CoordinatorConfig, &str); 8] = [
            (
                CoordinatorConfig { report_interval: Duration::ZERO, ..Default::default() },
                "report_interval must be greater than zero",
            ),
            (
                CoordinatorConfig { unreachable_after: Duration::from_secs(1), ..Default::default() },
                "unreachable_after (1s) must be longer than report_interval (1s)",
            ),
            (
                CoordinatorConfig { node_cert_validity: Duration::from_secs(5), ..Default::default() },
                "node_cert_validity (5s) must be at least 10s",
            ),
            (
                CoordinatorConfig {
                    isolation: IsolationSettings { pod_cidr: "10.42.0.0/x".into(), ..Default::default() },
                    ..Default::default()
                },
                "isolation.pod_cidr \"10.42.0.0/x\": ",
            ),
            (
                CoordinatorConfig {
                    isolation: IsolationSettings { management_cidrs: vec!["10.0.0.0/33".into()], ..Default::default() },
                    ..Default::default()
                },
                "isolation.management_cidrs \"10.0.0.0/33\": ",
            ),
            (
                CoordinatorConfig {
                    isolation: IsolationSettings { pids_per_pod: 0, ..Default::default() },
                    ..Default::default()
                },
                "isolation.pids_per_pod must be greater than zero",
            ),
            (
                CoordinatorConfig {
                    admission: crate::link::AdmissionLimits { max_per_address: 0, ..Default::default() },
                    ..Default::default()
                },
                "admission.max_per_address must be greater than zero",
            ),
            (
                CoordinatorConfig {
                    admission: crate::link::AdmissionLimits {
                        max_unauthenticated: 16,
                        max_per_address: 32,
                        retry_above: 8,
                    },
                    ..Default::default()
                },
                "admission.max_per_address: 32 is above admission.max_unauthenticated (16)",
            ),
        ];
        for (config, expected) in table {
            let err = config.validate().unwrap_err();
            assert!(err.to_string().starts_with(expected), "got {err}, expected {expected}");
            // The message is the whole story: nothing is printed again as a cause.
            assert!(std::error::Error::source(&err).is_none(), "{err:?}");
        }
        // Off, the CIDRs are not looked at.
        let off = IsolationSettings { enabled: false, pod_cidr: "nonsense".into(), ..Default::default() };
        assert_eq!(CoordinatorConfig { isolation: off, ..Default::default() }.validate(), Ok(()));
    }
}
