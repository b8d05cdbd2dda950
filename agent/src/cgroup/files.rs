//! Reading and writing single cgroup files below an injected root (after youki's
//! `libcgroups::common::write_cgroup_file`): every path is built from a root and a relative cgroup
//! path that cannot climb out of it, and every failure names the file.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};

use super::{CgroupError, CpuMax, Limit};

/// cgroup v1 reports "no limit" as a huge page-aligned number near `i64::MAX`; anything this large is unlimited.
pub(crate) const V1_UNLIMITED: u64 = 1 << 62;

/// Files that move processes between cgroups. The governor never writes them: kubelet and the container
/// runtime own placement; a write here would be a bug, so it is refused outright.
const PLACEMENT_FILES: [&str; 3] = ["cgroup.procs", "tasks", "cgroup.threads"];

/// `base/cgroup`, refusing a `cgroup` that is absolute or has `..` in it.
pub(crate) fn join(base: &Path, cgroup: &Path) -> Result<PathBuf, CgroupError> {
    if cgroup.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(base.join(cgroup))
    } else {
        Err(CgroupError::BadPath(cgroup.to_owned()))
    }
}

/// The file's content without surrounding whitespace.
pub(crate) fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|error| CgroupError::Read { path: path.to_owned(), error })
}

pub(crate) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read_trimmed(path)?;
    text.parse().map_err(|_| CgroupError::Parse { path: path.to_owned(), content: text, expected: "a number" })
}

/// `max` (v2), `-1` (v1 quota) or a number, where v1's near-`i64::MAX` numbers also mean no limit.
pub(crate) fn read_limit(path: &Path) -> Result<Limit, CgroupError> {
    let text = read_trimmed(path)?;
    parse_limit(&text).ok_or_else(|| CgroupError::Parse {
        path: path.to_owned(),
        content: text,
        expected: "\"max\", -1 or a number",
    })
}

pub(crate) fn parse_limit(text: &str) -> Option<Limit> {
    match text {
        "max" | "-1" => Some(Limit::Max),
        n => n.parse::<u64>().ok().map(|n| if n >= V1_UNLIMITED { Limit::Max } else { Limit::Value(n) }),
    }
}

/// The file's content without surrounding whitespace; `None` when it does not exist (for readers to
/// whom a missing file means "no limit here").
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CgroupError::Read { path: path.to_owned(), error }),
    }
}

/// [`read_u64`], `None` when the file does not exist.
pub(crate) fn read_optional_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
    read_optional(path)?
        .map(|text| {
            text.parse().map_err(|_| CgroupError::Parse { path: path.to_owned(), content: text, expected: "a number" })
        })
        .transpose()
}

/// [`read_limit`], `None` when the file does not exist.
pub(crate) fn read_optional_limit(path: &Path) -> Result<Option<Limit>, CgroupError> {
    read_optional(path)?
        .map(|text| {
            parse_limit(&text).ok_or_else(|| CgroupError::Parse {
                path: path.to_owned(),
                content: text,
                expected: "\"max\", -1 or a number",
            })
        })
        .transpose()
}

/// v2's `cpu.max`: `<quota|max> <period>`. The kernel always prints the period; should a writer
/// have left it out, it is the kernel's default, 100 ms.
pub(crate) fn parse_cpu_max(text: &str) -> Option<CpuMax> {
    let mut fields = text.split_whitespace();
    let quota_us = match fields.next()? {
        "max" => Limit::Max,
        quota => Limit::Value(quota.parse().ok()?),
    };
    let period_us = match fields.next() {
        Some(period) => period.parse().ok()?,
        None => super::DEFAULT_CPU_PERIOD_US,
    };
    Some(CpuMax { quota_us, period_us })
}

/// The value of `key` in a flat keyed file (`cpu.stat`: `usage_usec 1234`).
pub(crate) fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = read_trimmed(path)?;
    let value = text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key { v.trim().parse::<u64>().ok() } else { None }
    });
    value.ok_or_else(|| CgroupError::Parse { path: path.to_owned(), content: text, expected: "a `key value` line" })
}

/// Writes `value` to an existing cgroup file: no create (a missing file means a wrong path or a
/// controller that is not enabled, never something to invent), truncating (which cgroupfs ignores
/// and a fixture file needs).
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| PLACEMENT_FILES.contains(&n)) {
        return Err(CgroupError::Placement(path.to_owned()));
    }
    fs::OpenOptions::new()
        .create(false)
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|error| {
            let hint = hint(path, &error);
            CgroupError::Write { path: path.to_owned(), value: value.to_string(), error, hint }
        })
}

/// What an errno means for the file it came from, for the person reading the error.
fn hint(path: &Path, error: &io::Error) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match (error.raw_os_error(), name) {
        (Some(16), n) if n.starts_with("memory.") => {
            " (EBUSY: the pod already uses more than the new limit and the kernel could not reclaim it; the pod \
             stays at its old limit until its usage drops)"
        }
        (Some(22), "cpu.cfs_quota_us" | "cpu.cfs_period_us") => {
            " (EINVAL: cgroup v1 refuses a quota below a child cgroup's quota or above its parent's, and quotas \
             under 1000 us)"
        }
        (Some(2), _) => " (the cgroup is gone: the pod was deleted during the reconcile)",
        _ => "",
    }
}

/// Sorted names of the directories in `dir`; empty when `dir` does not exist.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<String>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(CgroupError::Read { path: dir.to_owned(), error }),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| CgroupError::Read { path: dir.to_owned(), error })?;
        // A cgroup is always a real directory; symlinks (v1's `cpu -> cpu,cpuacct`) are not children.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Rounds a memory value down to the page size, as the kernel does when it stores a memory limit, so
/// that comparing what we want with what the kernel reports back does not see a change that is none.
pub(crate) fn page_align(bytes: Limit) -> Limit {
    let page = procfs::page_size().max(1);
    match bytes {
        Limit::Max => Limit::Max,
        Limit::Value(b) => Limit::Value(b / page * page),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_in_both_dialects() {
        for (text, want) in [
            ("max", Some(Limit::Max)),
            ("-1", Some(Limit::Max)),
            ("9223372036854771712", Some(Limit::Max)),
            ("67108864", Some(Limit::Value(67_108_864))),
            ("0", Some(Limit::Value(0))),
            ("lots", None),
            ("-2", None),
        ] {
            assert_eq!(parse_limit(text), want, "{text}");
        }
    }

    #[test]
    fn cpu_max_parses_with_and_without_a_period() {
        let cpu = |quota_us, period_us| Some(CpuMax { quota_us, period_us });
        assert_eq!(parse_cpu_max("50000 100000"), cpu(Limit::Value(50_000), 100_000));
        assert_eq!(parse_cpu_max("max 100000\n"), cpu(Limit::Max, 100_000));
        assert_eq!(parse_cpu_max("25000"), cpu(Limit::Value(25_000), 100_000));
        for bad in ["", "fast", "max fast", "-1 100000"] {
            assert_eq!(parse_cpu_max(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn optional_files_may_be_missing_but_not_garbled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.max");
        assert_eq!(read_optional_limit(&path).unwrap(), None);
        assert_eq!(read_optional_u64(&path).unwrap(), None);
        fs::write(&path, "max\n").unwrap();
        assert_eq!(read_optional_limit(&path).unwrap(), Some(Limit::Max));
        fs::write(&path, "lots\n").unwrap();
        let err = read_optional_limit(&path).unwrap_err().to_string();
        assert!(err.contains("memory.max") && err.contains("lots"), "{err}");
        assert!(read_optional_u64(&path).is_err());
    }

    #[test]
    fn paths_cannot_leave_the_hierarchy() {
        let base = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(join(base, Path::new("kubepods/pod1")).unwrap(), base.join("kubepods/pod1"));
        assert!(matches!(join(base, Path::new("../cpu")), Err(CgroupError::BadPath(_))));
        assert!(matches!(join(base, Path::new("/etc")), Err(CgroupError::BadPath(_))));
    }

    #[test]
    fn never_writes_the_files_that_move_processes() {
        let dir = tempfile::tempdir().unwrap();
        for name in PLACEMENT_FILES {
            let path = dir.path().join(name);
            fs::write(&path, "").unwrap();
            assert!(matches!(write(&path, "1"), Err(CgroupError::Placement(_))), "{name}");
            assert_eq!(fs::read_to_string(&path).unwrap(), "");
        }
    }

    #[test]
    fn write_needs_an_existing_file_and_replaces_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.max");
        let err = write(&path, "max").unwrap_err();
        assert!(err.to_string().contains("memory.max"), "{err}");
        fs::write(&path, "67108864\n").unwrap();
        write(&path, "max").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "max");
    }
}
