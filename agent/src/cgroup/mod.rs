//! The node's cgroups, one layer for everything the agent reads or writes there: the collector (the
//! limits over the agent's own cgroup) and the governor (tenants' pod cgroups). Modelled on youki's
//! `libcgroups` (`common.rs`, `v2/`): every file is named from an injected root and a relative
//! cgroup path, and every failure names the file.
//!
//! - `files`: reading and writing single cgroup files, and the value formats of both versions;
//! - [`v2`] and [`v1`]: the [`Cgroups`] interface over the unified hierarchy and over v1's
//!   per-controller hierarchies, with the file names of each;
//! - [`discover`]: which hierarchy is mounted where, which cgroups a process is in
//!   (`/proc/<pid>/cgroup`), and where kubelet puts pod cgroups ([`Layout`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub mod discover;
pub(crate) mod files;
pub mod v1;
pub mod v2;

pub use discover::{Driver, Layout, PodCgroup, Qos};
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

impl CpuMax {
    /// The millicores this bandwidth allows, rounded up so that a small but real quota never reads
    /// as zero CPUs; `None` without a quota (or with a zero period).
    pub fn millis(&self) -> Option<u64> {
        let Limit::Value(quota_us) = self.quota_us else { return None };
        if self.period_us == 0 {
            return None;
        }
        let millis = (u128::from(quota_us) * 1000).div_ceil(u128::from(self.period_us));
        Some(u64::try_from(millis).unwrap_or(u64::MAX))
    }
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
    /// `pids.max`. Read back it is always `Some`; wanted, `None` leaves the file as it is (the
    /// allocation sets no pids cap).
    pub pids_max: Option<Limit>,
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
    if discover::is_unified(root) { Ok(Box::new(V2::new(root))) } else { Ok(Box::new(V1::new(root)?)) }
}

/// A cgroup file that could not be read, understood or written; every variant names it. The io
/// error is named in the message and is not also the `source`, so a printed chain names it once.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error("cannot write {value:?} to {path}: {error}{hint}")]
    Write { path: PathBuf, value: String, error: io::Error, hint: &'static str },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_bandwidth_in_millicores_rounds_up() {
        let cpu = |quota_us, period_us| CpuMax { quota_us, period_us }.millis();
        assert_eq!(cpu(Limit::Value(50_000), 100_000), Some(500));
        assert_eq!(cpu(Limit::Value(1), 100_000), Some(1));
        assert_eq!(cpu(Limit::Value(1), 0), None);
        assert_eq!(cpu(Limit::Max, 100_000), None);
    }
}
