//! Why the coordinator refuses a configuration. A leaf of the crate: the settings' modules
//! (`config`, `hostcluster::render`, `desired`) all return it, and it depends on none of them.

use std::time::Duration;

use hexa_shared::isolation::IsolationError;

use crate::placement::PlacementError;

/// A configuration the coordinator refuses to start with: which key, its value, and what to write
/// instead. The causes' text is part of the message and not repeated as a source.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} must be greater than zero")]
    Zero { key: &'static str },
    #[error(
        "{key} ({}) must be longer than {shorter} ({})",
        humantime::format_duration(*value),
        humantime::format_duration(*shorter_value)
    )]
    NotLonger { key: &'static str, value: Duration, shorter: &'static str, shorter_value: Duration },
    #[error("{key} ({}) must be at least {}", humantime::format_duration(*value), humantime::format_duration(*min))]
    TooShort { key: &'static str, value: Duration, min: Duration },
    #[error("{key} {value:?} is not a sha256 in hex (64 characters)")]
    NotSha256 { key: &'static str, value: String },
    #[error(
        "{key} {value:?} is plain http, where the binary and its checksum file could both be swapped on the \
         way: serve the release over https, or pin the binary with k3s.sha256 = \"<sha256 of the k3s binary>\""
    )]
    UnpinnedPlainHttp { key: &'static str, value: String },
    #[error("{key} {value:?} is not a chart repository URL: write https://... or oci://...")]
    NotChartRepo { key: &'static str, value: String },
    #[error("{key} {value:?} is not a version: pin one, e.g. 0.36.1")]
    NotChartVersion { key: &'static str, value: String },
    #[error("{key} {value:?} is not a Pod Security version: write latest or v1.<minor>, e.g. v1.33")]
    NotPodSecurityVersion { key: &'static str, value: String },
    #[error("{key} requests nothing: set cpu_request_millis and memory_request_bytes above 0")]
    RequestsNothing { key: String },
    #[error("{key}.memory_limit_bytes ({limit}) is below memory_request_bytes ({request}): raise the limit")]
    LimitBelowRequest { key: String, limit: u64, request: u64 },
    #[error("{key} is 0: set the kubelet's maxPods, e.g. 110")]
    NoPodsPerNode { key: &'static str },
    #[error("{key} {value:?}: {reason}")]
    Cidr { key: &'static str, value: String, reason: IsolationError },
    #[error(
        "{key} {path:?}: cannot read it ({error}); point it at a kubeconfig of the host cluster that the \
         coordinator may read, or set hostcluster.mode = \"manifests\" (or \"off\") to do without one"
    )]
    Unreadable { key: &'static str, path: String, error: String },
    #[error("{key} {path:?}: cannot read it ({error}); point it at a PEM file the coordinator may read")]
    UnreadableFile { key: &'static str, path: String, error: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(transparent)]
    Placement(#[from] PlacementError),
}
