//! cgroup v2: one unified hierarchy; a pod cgroup's files are all in its directory.
//!
//! | what            | file                                  |
//! |-----------------|---------------------------------------|
//! | cpu usage       | `cpu.stat` `usage_usec`               |
//! | memory usage    | `memory.current`                      |
//! | pids            | `pids.current`                        |
//! | cpu limit       | `cpu.max` (`<quota> <period>`, `max <period>`) |
//! | memory limit    | `memory.max`                          |
//! | memory pressure | `memory.high`                         |
//! | pids limit      | `pids.max`                            |

use std::path::{Path, PathBuf};

use super::files::{self, join, page_align};
use super::{CgroupError, CgroupVersion, Cgroups, CpuMax, FileWrite, PodLimits, PodUsage};

/// CPU bandwidth: `<quota|max> <period>`.
pub const CPU_MAX: &str = "cpu.max";
/// CPU time used (`usage_usec`) and throttling.
pub const CPU_STAT: &str = "cpu.stat";
/// The hard memory limit.
pub const MEMORY_MAX: &str = "memory.max";
/// The memory level above which the cgroup is throttled and reclaimed.
pub const MEMORY_HIGH: &str = "memory.high";
/// Memory in use, page cache included.
pub const MEMORY_CURRENT: &str = "memory.current";
/// The cap on processes and threads.
pub const PIDS_MAX: &str = "pids.max";
/// Processes and threads now.
pub const PIDS_CURRENT: &str = "pids.current";

/// What `cpu.max` holds, for errors.
pub(crate) const CPU_MAX_FORMAT: &str = "`<quota|max> <period>`";

/// The unified hierarchy mounted at `root`.
#[derive(Debug, Clone)]
pub struct V2 {
    root: PathBuf,
}

impl V2 {
    pub fn new(root: &Path) -> V2 {
        V2 { root: root.to_owned() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, cgroup: &Path, name: &str) -> Result<PathBuf, CgroupError> {
        Ok(join(&self.root, cgroup)?.join(name))
    }

    fn cpu_max(&self, cgroup: &Path) -> Result<CpuMax, CgroupError> {
        let path = self.file(cgroup, CPU_MAX)?;
        let text = files::read_trimmed(&path)?;
        files::parse_cpu_max(&text).ok_or(CgroupError::Parse { path, content: text, expected: CPU_MAX_FORMAT })
    }
}

impl Cgroups for V2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn children(&self, cgroup: &Path) -> Result<Vec<String>, CgroupError> {
        files::subdirs(&join(&self.root, cgroup)?)
    }

    fn usage(&self, cgroup: &Path) -> Result<PodUsage, CgroupError> {
        Ok(PodUsage {
            cpu_usage_usec: files::read_keyed(&self.file(cgroup, CPU_STAT)?, "usage_usec")?,
            memory_bytes: files::read_u64(&self.file(cgroup, MEMORY_CURRENT)?)?,
            pids: files::read_u64(&self.file(cgroup, PIDS_CURRENT)?)?,
        })
    }

    fn limits(&self, cgroup: &Path) -> Result<PodLimits, CgroupError> {
        Ok(PodLimits {
            cpu: self.cpu_max(cgroup)?,
            memory_max: files::read_limit(&self.file(cgroup, MEMORY_MAX)?)?,
            memory_high: files::read_limit(&self.file(cgroup, MEMORY_HIGH)?)?,
            pids_max: Some(files::read_limit(&self.file(cgroup, PIDS_MAX)?)?),
        })
    }

    fn apply(&self, cgroup: &Path, want: &PodLimits) -> Result<Vec<FileWrite>, CgroupError> {
        let have = self.limits(cgroup)?;
        let mut writes = Vec::new();
        let mut put = |name: &str, value: String| -> Result<(), CgroupError> {
            let path = self.file(cgroup, name)?;
            files::write(&path, &value)?;
            writes.push(FileWrite { path, value });
            Ok(())
        };
        if have.cpu != want.cpu {
            put(CPU_MAX, format!("{} {}", want.cpu.quota_us, want.cpu.period_us))?;
        }
        // memory.high before memory.max: when both go down, the pod is squeezed by reclaim before
        // the hard limit can OOM-kill it.
        let memory_high = page_align(want.memory_high);
        if have.memory_high != memory_high {
            put(MEMORY_HIGH, memory_high.to_string())?;
        }
        let memory_max = page_align(want.memory_max);
        if have.memory_max != memory_max {
            put(MEMORY_MAX, memory_max.to_string())?;
        }
        if let Some(pids_max) = want.pids_max.filter(|&wanted| have.pids_max != Some(wanted)) {
            put(PIDS_MAX, pids_max.to_string())?;
        }
        Ok(writes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;

    use super::*;
    use crate::cgroup::Limit;

    /// A v2-shaped pod cgroup as kubelet leaves it: no limits, some usage.
    pub(crate) fn pod(root: &Path, cgroup: &str, usage_usec: u64, memory: u64, pids: u64) {
        let dir = root.join(cgroup);
        fs::create_dir_all(&dir).unwrap();
        for (name, content) in [
            ("cgroup.controllers", "cpu memory pids\n".to_string()),
            ("cgroup.procs", String::new()),
            ("cpu.max", "max 100000\n".to_string()),
            ("memory.max", "max\n".to_string()),
            ("memory.high", "max\n".to_string()),
            ("pids.max", "max\n".to_string()),
            ("memory.current", format!("{memory}\n")),
            ("pids.current", format!("{pids}\n")),
            (
                "cpu.stat",
                format!("usage_usec {usage_usec}\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\n"),
            ),
        ] {
            fs::write(dir.join(name), content).unwrap();
        }
    }

    /// Moves a fixture pod's cpu counter on, as if it had run `usec` more.
    pub(crate) fn run(root: &Path, cgroup: &str, usage_usec: u64) {
        let path = root.join(cgroup).join("cpu.stat");
        fs::write(path, format!("usage_usec {usage_usec}\nnr_throttled 0\n")).unwrap();
    }

    pub(crate) fn fixture_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
        root
    }

    const POD: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice";

    fn read(root: &Path, name: &str) -> String {
        fs::read_to_string(root.join(POD).join(name)).unwrap()
    }

    #[test]
    fn the_root_is_detected_as_v2() {
        let root = fixture_root();
        assert_eq!(super::super::open(root.path()).unwrap().version(), CgroupVersion::V2);
    }

    #[test]
    fn reads_usage_from_the_v2_files() {
        let root = fixture_root();
        pod(root.path(), POD, 1_234_567, 50 << 20, 7);
        let usage = V2::new(root.path()).usage(Path::new(POD)).unwrap();
        assert_eq!(usage, PodUsage { cpu_usage_usec: 1_234_567, memory_bytes: 50 << 20, pids: 7 });
    }

    #[test]
    fn writes_limits_in_the_v2_formats_and_only_what_changed() {
        let root = fixture_root();
        pod(root.path(), POD, 0, 0, 0);
        let cgroups = V2::new(root.path());
        let want = PodLimits {
            cpu: CpuMax { quota_us: Limit::Value(50_000), period_us: 100_000 },
            memory_max: Limit::Value(64 << 20),
            memory_high: Limit::Max,
            pids_max: Some(Limit::Value(256)),
        };
        let writes = cgroups.apply(Path::new(POD), &want).unwrap();
        let names: Vec<_> = writes.iter().map(|w| w.path.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["cpu.max", "memory.max", "pids.max"], "memory.high is already max");
        assert_eq!(read(root.path(), "cpu.max"), "50000 100000");
        assert_eq!(read(root.path(), "memory.max"), "67108864");
        assert_eq!(read(root.path(), "memory.high"), "max\n", "untouched");
        assert_eq!(read(root.path(), "pids.max"), "256");
        assert_eq!(cgroups.limits(Path::new(POD)).unwrap(), want);

        // The same limits again: nothing is written.
        assert_eq!(cgroups.apply(Path::new(POD), &want).unwrap(), []);

        // A value that is not page-aligned is compared as the kernel would store it.
        let unaligned = PodLimits { memory_high: Limit::Value((32 << 20) + 100), ..want };
        assert_eq!(cgroups.apply(Path::new(POD), &unaligned).unwrap().len(), 1);
        assert_eq!(read(root.path(), "memory.high"), (32u64 << 20).to_string());
        assert_eq!(cgroups.apply(Path::new(POD), &unaligned).unwrap(), []);

        // Lifting limits writes `max`.
        let lifted = PodLimits { cpu: CpuMax { quota_us: Limit::Max, period_us: 100_000 }, ..unaligned };
        cgroups.apply(Path::new(POD), &lifted).unwrap();
        assert_eq!(read(root.path(), "cpu.max"), "max 100000");
        assert_eq!(read(root.path(), "cgroup.procs"), "", "no process was moved");
    }

    #[test]
    fn a_missing_or_garbled_file_is_named_in_the_error() {
        let root = fixture_root();
        pod(root.path(), POD, 0, 0, 0);
        fs::write(root.path().join(POD).join("cpu.max"), "fast\n").unwrap();
        let err = V2::new(root.path()).limits(Path::new(POD)).unwrap_err();
        assert!(err.to_string().contains("cpu.max") && err.to_string().contains("fast"), "{err}");
        fs::remove_file(root.path().join(POD).join("pids.current")).unwrap();
        let err = V2::new(root.path()).usage(Path::new(POD)).unwrap_err();
        assert!(err.to_string().contains("pids.current"), "{err}");
    }
}
