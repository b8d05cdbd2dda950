//! The cgroup governor: keeps each tenant's pods on this node within the tenant's allocation here.
//!
//! # What it enforces
//! For every tenant with an allocation `A` on this node (cpu millis, memory bytes, pids):
//! - **no single pod above the share**: each of the tenant's pod cgroups gets `memory.max = A.memory`,
//!   `pids.max = A.pids` and `cpu.max = A.cpu` (a quota of `A.cpu_millis` per 1000 of the period);
//! - **cpu split under contention**: when the tenant's pods together used at least
//!   [`PolicySettings::cpu_split_percent`] of `A.cpu` since the last reconcile, the tenant's quota is
//!   split among its pods in proportion to that recent use, summing to exactly the tenant's quota
//!   (largest-remainder rounding, with a floor per pod so that none starves). The split stays while
//!   the tenant keeps pressing against its share and is lifted when it falls below the threshold;
//! - **memory pressure on the largest**: when the tenant's pods together hold at least
//!   [`PolicySettings::memory_pressure_percent`] of `A.memory`, every pod of the tenant gets
//!   `memory.high = L`, the water level at which the pods' usage capped at `L` adds up to the share:
//!   the pods above `L` (the largest) are reclaimed down to it and the total comes back to the share.
//!   While the tenant is under its share, `L` leaves the remaining headroom above the largest pod.
//!
//! Pods of tenants without an allocation here (system pods, pods the pod list does not name) are not
//! touched. The governor never moves processes: it writes no `cgroup.procs`/`tasks` file (refused in
//! `files.rs`); kubelet and the container runtime own placement. Every write goes to a file whose
//! value differs from the wanted one (read, compare, write), so a reconcile with no change writes
//! nothing. Each reconcile returns the per-tenant usage ([`TenantUsage`]) for the report.
//!
//! # Pids
//! The coordinator's `hexa_shared::spec::TenantAllocation` carries a pod count, not a pids cap: the governor derives
//! `A.pids = max(pods, 1) × GovernorSettings::pids_per_pod` (default 1024, the common kubelet
//! `podPidsLimit`). A caller that already has a pids cap builds [`TenantShare`]s itself.
//!
//! # Layout
//! - [`discover`]: where kubelet puts pod cgroups under each driver ([`Layout`]);
//! - [`policy`]: the pure decision, from allocations and samples to wanted [`PodLimits`];
//! - [`v2`] and [`v1`]: the [`Cgroups`] interface over the unified hierarchy and over v1's
//!   per-controller hierarchies, each below an injected root (`/sys/fs/cgroup` in production);
//! - [`Governor`]: one reconcile = discover, sample, decide, write what changed.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub mod discover;
mod files;
mod governor;
pub mod policy;
pub mod v1;
pub mod v2;

pub use discover::{Driver, Layout, PodCgroup, Qos};
pub use governor::{Governor, GovernorSettings, PodFailure, PodTenant, Reconcile};
pub use policy::{PolicySettings, TenantShare, TenantUsage};
pub use v1::V1;
pub use v2::V2;

/// The kernel's smallest CFS quota (and period): 1 ms.
pub const MIN_CPU_QUOTA_US: u64 = 1000;
/// The CFS period the governor writes, the kernel's and kubelet's default: 100 ms.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// A cgroup limit: a number, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    Max,
    Value(u64),
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Max => f.write_str("max"),
            Limit::Value(v) => write!(f, "{v}"),
        }
    }
}

/// CFS bandwidth: at most `quota_us` of CPU time per `period_us` (v2 `cpu.max`, v1
/// `cpu.cfs_quota_us` + `cpu.cfs_period_us`). A quota above the period spans several CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuMax {
    pub quota_us: Limit,
    pub period_us: u64,
}

/// The limits the governor sets on a pod cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodLimits {
    pub cpu: CpuMax,
    /// v2 `memory.max`, v1 `memory.limit_in_bytes`: above it the pod's processes are OOM-killed.
    pub memory_max: Limit,
    /// v2 `memory.high`: above it the pod is throttled and reclaimed. v1 has no equivalent; it is
    /// approximated by `memory.soft_limit_in_bytes` (see [`v1`]).
    pub memory_high: Limit,
    pub pids_max: Limit,
}

/// What a pod cgroup uses now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodUsage {
    /// CPU time since the cgroup was created (v2 `cpu.stat usage_usec`, v1 `cpuacct.usage` / 1000).
    pub cpu_usage_usec: u64,
    /// v2 `memory.current`, v1 `memory.usage_in_bytes` (both include page cache).
    pub memory_bytes: u64,
    /// Processes and threads (`pids.current`).
    pub pids: u64,
}

/// One cgroup file the governor wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: PathBuf,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The pod cgroups of one node, over cgroup v2 or v1. Cgroups are named by their path relative to
/// the hierarchy root (`kubepods/burstable/pod<uid>`), the same under every v1 controller.
pub trait Cgroups: fmt::Debug + Send + Sync {
    fn version(&self) -> CgroupVersion;

    /// Sorted names of the child cgroups of `cgroup` (`""` for the root); empty when it does not exist.
    fn children(&self, cgroup: &Path) -> Result<Vec<String>, CgroupError>;

    fn usage(&self, cgroup: &Path) -> Result<PodUsage, CgroupError>;

    fn limits(&self, cgroup: &Path) -> Result<PodLimits, CgroupError>;

    /// Brings `cgroup` to `limits`, reading each file first and writing only those whose value
    /// differs (memory values compared after the kernel's rounding to pages). Returns what it wrote.
    fn apply(&self, cgroup: &Path, limits: &PodLimits) -> Result<Vec<FileWrite>, CgroupError>;
}

/// The node's cgroups below `root` (`/sys/fs/cgroup` in production): the unified hierarchy when
/// `root` is one (`cgroup.controllers` present), otherwise the v1 controllers mounted beneath it. A
/// hybrid host (v1 controllers plus an empty `unified/`) is v1: that is where kubelet's limits live.
pub fn open(root: &Path) -> Result<Box<dyn Cgroups>, CgroupError> {
    if root.join("cgroup.controllers").is_file() { Ok(Box::new(V2::new(root))) } else { Ok(Box::new(V1::new(root)?)) }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}{hint}")]
    Write { path: PathBuf, value: String, source: io::Error, hint: &'static str },
    #[error("{path} holds {content:?}, expected {expected}")]
    Parse { path: PathBuf, content: String, expected: &'static str },
    #[error(
        "no cgroup {what} under {root}: mount cgroup2 there, or the v1 cpu, cpuacct, memory and pids \
         controllers beneath it (or point the agent's cgroup root at where they are)"
    )]
    NoHierarchy { root: PathBuf, what: String },
    #[error("cgroup path {0:?} must be relative and stay inside the hierarchy")]
    BadPath(PathBuf),
    #[error("refusing to write {0}: the governor never moves processes between cgroups")]
    Placement(PathBuf),
}
