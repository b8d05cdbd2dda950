//! cgroup v1: one hierarchy per controller, each with the same pod paths beneath it.
//!
//! | what            | hierarchy                    | file                                       |
//! |-----------------|------------------------------|--------------------------------------------|
//! | cpu usage       | `cpuacct` (or `cpu,cpuacct`) | `cpuacct.usage` (ns, reported in us)       |
//! | memory usage    | `memory`                     | `memory.usage_in_bytes`                    |
//! | pids            | `pids`                       | `pids.current`                             |
//! | cpu limit       | `cpu` (or `cpu,cpuacct`)     | `cpu.cfs_quota_us` (`-1`: none), `cpu.cfs_period_us` |
//! | memory limit    | `memory`                     | `memory.limit_in_bytes` (`-1`: none)       |
//! | memory pressure | `memory`                     | `memory.soft_limit_in_bytes` (approximation) |
//! | pids limit      | `pids`                       | `pids.max`                                 |
//!
//! Pods are discovered in the `memory` hierarchy (kubelet creates every pod cgroup in all of them).
//!
//! # Where v1 differs
//! - **`memory.high` has no v1 counterpart.** It is approximated by `memory.soft_limit_in_bytes`,
//!   which does not throttle or reclaim on its own: only when the *node* runs short of memory does
//!   the kernel reclaim first from the cgroups furthest above their soft limit. So on v1 the
//!   "pressure on the largest pods" is a priority for reclaim under node pressure, not the immediate
//!   squeeze v2 gives; `memory.limit_in_bytes` (the per-pod cap at the tenant's share) is as hard as
//!   v2's `memory.max`.
//! - **A pod's cpu quota may not be below a child's.** v1 refuses (`EINVAL`) a quota whose
//!   quota/period ratio is below that of a cgroup beneath it, and kubelet gives each container of a
//!   pod with cpu limits its own quota. Before lowering a pod's quota the governor therefore lowers
//!   the container quotas above the new one to it (deepest first; a container cannot use more than
//!   its pod anyway), remembers what they were, and raises them back towards that when the pod's
//!   quota goes up again. The memory is the agent process's: after an agent restart, a clamped
//!   container keeps its lower quota until kubelet rewrites it.
//! - Lowering `memory.limit_in_bytes` below what the pod uses makes the kernel reclaim; if it cannot,
//!   the write fails with `EBUSY` and the pod keeps its old limit (v2 would OOM-kill instead).
//! - With swap accounting on, `memory.limit_in_bytes` may not exceed `memory.memsw.limit_in_bytes`;
//!   kubelet leaves the latter unlimited, and so does the governor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::discover::v1_hierarchy;
use super::files::{self, join, page_align};
use super::{CgroupError, CgroupVersion, Cgroups, CpuMax, FileWrite, Limit, MIN_CPU_QUOTA_US, PodLimits, PodUsage};

/// `cpu`: the CFS quota in microseconds per period, `-1` for none.
pub const CPU_CFS_QUOTA: &str = "cpu.cfs_quota_us";
/// `cpu`: the CFS period in microseconds.
pub const CPU_CFS_PERIOD: &str = "cpu.cfs_period_us";
/// `cpuacct`: CPU time used, in nanoseconds.
pub const CPUACCT_USAGE: &str = "cpuacct.usage";
/// `memory`: the hard limit.
pub const MEMORY_LIMIT: &str = "memory.limit_in_bytes";
/// `memory`: the soft limit (v1's stand-in for v2's `memory.high`).
pub const MEMORY_SOFT_LIMIT: &str = "memory.soft_limit_in_bytes";
/// `memory`: memory in use, page cache included.
pub const MEMORY_USAGE: &str = "memory.usage_in_bytes";
/// `pids`: the cap on processes and threads.
pub const PIDS_MAX: &str = "pids.max";
/// `pids`: processes and threads now.
pub const PIDS_CURRENT: &str = "pids.current";

/// The v1 controllers mounted below `root`.
#[derive(Debug)]
pub struct V1 {
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    pids: PathBuf,
    /// Container cgroups whose quota the governor lowered below kubelet's, with kubelet's value.
    clamped: Mutex<BTreeMap<PathBuf, CpuMax>>,
}

impl V1 {
    /// Finds each controller's hierarchy below `root`: `<root>/<controller>`, or a co-mounted
    /// `<root>/cpu,cpuacct` when there is no `cpu`/`cpuacct` link to it.
    pub fn new(root: &Path) -> Result<V1, CgroupError> {
        Ok(V1 {
            memory: v1_hierarchy(root, "memory")?,
            cpu: v1_hierarchy(root, "cpu")?,
            cpuacct: v1_hierarchy(root, "cpuacct")?,
            pids: v1_hierarchy(root, "pids")?,
            clamped: Mutex::new(BTreeMap::new()),
        })
    }

    /// The hierarchies, for callers that need to look at a file the interface does not cover.
    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    pub fn cpu_dir(&self) -> &Path {
        &self.cpu
    }

    pub fn cpuacct_dir(&self) -> &Path {
        &self.cpuacct
    }

    pub fn pids_dir(&self) -> &Path {
        &self.pids
    }

    fn cpu_max(dir: &Path) -> Result<CpuMax, CgroupError> {
        Ok(CpuMax {
            quota_us: files::read_limit(&dir.join(CPU_CFS_QUOTA))?,
            period_us: files::read_u64(&dir.join(CPU_CFS_PERIOD))?,
        })
    }

    /// Sets the pod's cpu bandwidth, moving the quotas of the cgroups beneath it out of the way.
    fn apply_cpu(&self, cgroup: &Path, want: CpuMax, writes: &mut Vec<FileWrite>) -> Result<(), CgroupError> {
        let dir = join(&self.cpu, cgroup)?;
        let have = Self::cpu_max(&dir)?;
        // A poisoned lock only means another apply panicked; the map itself is still consistent.
        let mut clamped = self.clamped.lock().unwrap_or_else(|e| e.into_inner());
        clamped.retain(|path, _| path.is_dir());

        // What each descendant should have: kubelet's value, capped at the pod's new rate.
        let mut plan = Vec::new();
        for sub in descendants(&dir)? {
            let now = match Self::cpu_max(&sub) {
                Ok(now) => now,
                // A container that exited while we walked: nothing to move out of the way.
                Err(CgroupError::Read { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let original = clamped.get(&sub).copied().unwrap_or(now);
            let target = match (original.quota_us, want.quota_us) {
                (Limit::Max, _) => continue,
                (Limit::Value(q), Limit::Max) => q,
                (Limit::Value(q), Limit::Value(pod)) => {
                    let scaled = u128::from(pod) * u128::from(now.period_us) / u128::from(want.period_us.max(1));
                    q.min(u64::try_from(scaled).unwrap_or(u64::MAX).max(MIN_CPU_QUOTA_US))
                }
            };
            plan.push((sub, now, original, target));
        }
        // Lower children before their parents, then the pod, then raise parents before children.
        for (sub, now, original, target) in plan.iter().rev() {
            if Limit::Value(*target) < now.quota_us {
                clamped.entry(sub.clone()).or_insert(*original);
                put(&sub.join(CPU_CFS_QUOTA), target.to_string(), writes)?;
            }
        }
        if have.period_us != want.period_us {
            put(&dir.join(CPU_CFS_PERIOD), want.period_us.to_string(), writes)?;
        }
        if have.quota_us != want.quota_us {
            put(&dir.join(CPU_CFS_QUOTA), v1_limit(want.quota_us), writes)?;
        }
        for (sub, now, original, target) in &plan {
            if Limit::Value(*target) > now.quota_us {
                put(&sub.join(CPU_CFS_QUOTA), target.to_string(), writes)?;
            }
            if Limit::Value(*target) == original.quota_us {
                clamped.remove(sub);
            }
        }
        Ok(())
    }
}

/// Every cgroup below `dir`, parents before children.
fn descendants(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut out = Vec::new();
    for name in files::subdirs(dir)? {
        let sub = dir.join(name);
        let below = descendants(&sub)?;
        out.push(sub);
        out.extend(below);
    }
    Ok(out)
}

/// v1 spells "no limit" `-1`.
fn v1_limit(limit: Limit) -> String {
    match limit {
        Limit::Max => "-1".to_string(),
        Limit::Value(v) => v.to_string(),
    }
}

fn put(path: &Path, value: String, writes: &mut Vec<FileWrite>) -> Result<(), CgroupError> {
    files::write(path, &value)?;
    writes.push(FileWrite { path: path.to_owned(), value });
    Ok(())
}

impl Cgroups for V1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn children(&self, cgroup: &Path) -> Result<Vec<String>, CgroupError> {
        files::subdirs(&join(&self.memory, cgroup)?)
    }

    fn usage(&self, cgroup: &Path) -> Result<PodUsage, CgroupError> {
        let nanos = files::read_u64(&join(&self.cpuacct, cgroup)?.join(CPUACCT_USAGE))?;
        Ok(PodUsage {
            cpu_usage_usec: nanos / 1000,
            memory_bytes: files::read_u64(&join(&self.memory, cgroup)?.join(MEMORY_USAGE))?,
            pids: files::read_u64(&join(&self.pids, cgroup)?.join(PIDS_CURRENT))?,
        })
    }

    fn limits(&self, cgroup: &Path) -> Result<PodLimits, CgroupError> {
        let memory = join(&self.memory, cgroup)?;
        Ok(PodLimits {
            cpu: Self::cpu_max(&join(&self.cpu, cgroup)?)?,
            memory_max: files::read_limit(&memory.join(MEMORY_LIMIT))?,
            memory_high: files::read_limit(&memory.join(MEMORY_SOFT_LIMIT))?,
            pids_max: Some(files::read_limit(&join(&self.pids, cgroup)?.join(PIDS_MAX))?),
        })
    }

    fn apply(&self, cgroup: &Path, want: &PodLimits) -> Result<Vec<FileWrite>, CgroupError> {
        let have = self.limits(cgroup)?;
        let mut writes = Vec::new();
        if have.cpu != want.cpu {
            self.apply_cpu(cgroup, want.cpu, &mut writes)?;
        }
        let memory = join(&self.memory, cgroup)?;
        let soft = page_align(want.memory_high);
        if have.memory_high != soft {
            put(&memory.join(MEMORY_SOFT_LIMIT), v1_limit(soft), &mut writes)?;
        }
        let hard = page_align(want.memory_max);
        if have.memory_max != hard {
            put(&memory.join(MEMORY_LIMIT), v1_limit(hard), &mut writes)?;
        }
        if let Some(pids_max) = want.pids_max.filter(|&wanted| have.pids_max != Some(wanted)) {
            put(&join(&self.pids, cgroup)?.join(PIDS_MAX), pids_max.to_string(), &mut writes)?;
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A v1 host with `cpu` and `cpuacct` co-mounted as `cpu,cpuacct`, like most systemd distributions.
    fn host() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for controller in ["memory", "cpu,cpuacct", "pids"] {
            fs::create_dir_all(root.path().join(controller)).unwrap();
            fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        fs::create_dir_all(root.path().join("unified")).unwrap();
        root
    }

    fn pod(root: &Path, cgroup: &str) {
        let files: [(&str, &[(&str, &str)]); 3] = [
            (
                "memory",
                &[
                    ("memory.limit_in_bytes", "9223372036854771712\n"),
                    ("memory.soft_limit_in_bytes", "9223372036854771712\n"),
                    ("memory.usage_in_bytes", "10485760\n"),
                ],
            ),
            (
                "cpu,cpuacct",
                &[("cpu.cfs_quota_us", "-1\n"), ("cpu.cfs_period_us", "100000\n"), ("cpuacct.usage", "2500000000\n")],
            ),
            ("pids", &[("pids.max", "max\n"), ("pids.current", "3\n")]),
        ];
        for (controller, contents) in files {
            let dir = root.join(controller).join(cgroup);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            for (name, content) in contents {
                fs::write(dir.join(name), content).unwrap();
            }
        }
    }

    const POD: &str = "kubepods/burstable/podabcd";

    fn quota(root: &Path, cgroup: &str) -> String {
        fs::read_to_string(root.join("cpu,cpuacct").join(cgroup).join("cpu.cfs_quota_us")).unwrap().trim().to_string()
    }

    #[test]
    fn a_hybrid_host_is_v1_and_co_mounted_controllers_are_found() {
        let root = host();
        let cgroups = super::super::open(root.path()).unwrap();
        assert_eq!(cgroups.version(), CgroupVersion::V1);
        let v1 = V1::new(root.path()).unwrap();
        assert_eq!(v1.cpu_dir(), root.path().join("cpu,cpuacct"));
        assert_eq!(v1.cpuacct_dir(), root.path().join("cpu,cpuacct"));
        fs::remove_file(root.path().join("pids/cgroup.procs")).unwrap();
        let err = V1::new(root.path()).unwrap_err();
        assert!(err.to_string().contains("`pids`"), "{err}");
    }

    #[test]
    fn reads_usage_and_writes_limits_in_the_v1_files() {
        let root = host();
        pod(root.path(), POD);
        let v1 = V1::new(root.path()).unwrap();
        let usage = v1.usage(Path::new(POD)).unwrap();
        assert_eq!(usage, PodUsage { cpu_usage_usec: 2_500_000, memory_bytes: 10 << 20, pids: 3 });
        let want = PodLimits {
            cpu: CpuMax { quota_us: Limit::Value(50_000), period_us: 100_000 },
            memory_max: Limit::Value(64 << 20),
            memory_high: Limit::Value(48 << 20),
            pids_max: Some(Limit::Value(128)),
        };
        let writes = v1.apply(Path::new(POD), &want).unwrap();
        let written: Vec<_> = writes
            .iter()
            .map(|w| (w.path.strip_prefix(root.path()).unwrap().to_str().unwrap().to_string(), w.value.as_str()))
            .collect();
        assert_eq!(
            written,
            [
                (format!("cpu,cpuacct/{POD}/cpu.cfs_quota_us"), "50000"),
                (format!("memory/{POD}/memory.soft_limit_in_bytes"), "50331648"),
                (format!("memory/{POD}/memory.limit_in_bytes"), "67108864"),
                (format!("pids/{POD}/pids.max"), "128"),
            ]
        );
        assert_eq!(v1.apply(Path::new(POD), &want).unwrap(), [], "no change, no write");
        let lifted =
            PodLimits { memory_high: Limit::Max, cpu: CpuMax { quota_us: Limit::Max, period_us: 100_000 }, ..want };
        v1.apply(Path::new(POD), &lifted).unwrap();
        assert_eq!(quota(root.path(), POD), "-1");
        let soft = fs::read_to_string(root.path().join("memory").join(POD).join("memory.soft_limit_in_bytes")).unwrap();
        assert_eq!(soft, "-1");
    }

    #[test]
    fn container_quotas_above_the_pod_are_lowered_first_and_restored_later() {
        let root = host();
        pod(root.path(), POD);
        let container = format!("{POD}/ctr");
        pod(root.path(), &container);
        fs::write(root.path().join("cpu,cpuacct").join(&container).join("cpu.cfs_quota_us"), "200000").unwrap();
        let v1 = V1::new(root.path()).unwrap();
        let limits = |quota| PodLimits {
            cpu: CpuMax { quota_us: quota, period_us: 100_000 },
            memory_max: Limit::Max,
            memory_high: Limit::Max,
            pids_max: Some(Limit::Max),
        };
        let order = |writes: Vec<FileWrite>| -> Vec<String> {
            writes.into_iter().map(|w| w.path.parent().unwrap().file_name().unwrap().to_str().unwrap().into()).collect()
        };

        let writes = v1.apply(Path::new(POD), &limits(Limit::Value(30_000))).unwrap();
        assert_eq!(order(writes), ["ctr", "podabcd"], "the container goes down before the pod");
        assert_eq!(quota(root.path(), &container), "30000");

        let writes = v1.apply(Path::new(POD), &limits(Limit::Value(150_000))).unwrap();
        assert_eq!(order(writes), ["podabcd", "ctr"], "the pod goes up before the container");
        assert_eq!(quota(root.path(), &container), "150000");

        v1.apply(Path::new(POD), &limits(Limit::Max)).unwrap();
        assert_eq!(quota(root.path(), &container), "200000", "kubelet's quota is back");
        assert!(v1.clamped.lock().unwrap().is_empty());
    }
}
