//! Where the cgroups are: which hierarchy is mounted where below the cgroup root ([`is_unified`],
//! [`unified_root`], [`v1_hierarchy`]), which cgroups a process is in ([`membership`], from
//! `/proc/<pid>/cgroup`), and where kubelet puts pod cgroups ([`Layout`], [`discover`]).
//!
//! # Pod cgroups
//! kubelet's layout, for both of its cgroup drivers:
//! - systemd driver: Guaranteed `kubepods.slice/kubepods-pod<uid_>.slice`; Burstable
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`; BestEffort the same
//!   with `besteffort`;
//! - cgroupfs driver: Guaranteed `kubepods/pod<uid>`; Burstable `kubepods/burstable/pod<uid>`;
//!   BestEffort `kubepods/besteffort/pod<uid>`.
//!
//! `<uid_>` is the pod UID with `-` replaced by `_` (systemd reserves `-` for slice nesting). The
//! top-level cgroup is configurable ([`Layout::base`]) for a kubelet started with `--cgroup-root`, and
//! for tests that build a fake tree next to the real one. Discovery lists directories only; container
//! cgroups below a pod are not pods and are not descended into.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::{CgroupError, CgroupVersion, Cgroups, files};

/// Whether `root` is a unified (v2) hierarchy: it has `cgroup.controllers`.
pub fn is_unified(root: &Path) -> bool {
    root.join("cgroup.controllers").is_file()
}

/// The unified hierarchy: `root` itself on a pure v2 host, `unified/` beneath it on a hybrid one.
pub fn unified_root(root: &Path) -> PathBuf {
    let unified = root.join("unified");
    if !is_unified(root) && unified.is_dir() { unified } else { root.to_owned() }
}

/// The v1 hierarchy of `controller` below `root`: `<root>/<controller>`, or a co-mounted
/// `<root>/cpu,cpuacct` when there is no `cpu`/`cpuacct` link to it. A hierarchy has `cgroup.procs`.
pub fn v1_hierarchy(root: &Path, controller: &str) -> Result<PathBuf, CgroupError> {
    let is_hierarchy = |dir: &Path| dir.join("cgroup.procs").is_file();
    let direct = root.join(controller);
    if is_hierarchy(&direct) {
        return Ok(direct);
    }
    for name in files::subdirs(root)? {
        if name.split(',').any(|c| c == controller) && is_hierarchy(&root.join(&name)) {
            return Ok(root.join(name));
        }
    }
    Err(CgroupError::NoHierarchy { root: root.to_owned(), what: format!("v1 `{controller}` controller") })
}

/// One controller's directories for a process's cgroup and each ancestor, leaf first, ending at the
/// hierarchy's root: a parent's limit bounds its children, so the effective limit is the minimum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerDirs {
    pub version: CgroupVersion,
    pub levels: Vec<PathBuf>,
}

impl ControllerDirs {
    fn new(version: CgroupVersion, root: PathBuf, cgroup_path: &str) -> Self {
        let mut levels = vec![root.clone()];
        let mut current = root;
        for part in Path::new(cgroup_path).components() {
            // The kernel writes absolute, normalised paths; anything else is ignored rather than allowed to
            // climb out of the cgroup root.
            if let Component::Normal(name) = part {
                current = current.join(name);
                levels.push(current.clone());
            }
        }
        levels.reverse();
        ControllerDirs { version, levels }
    }
}

/// The memory and cpu cgroups of a process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub memory: Option<ControllerDirs>,
    pub cpu: Option<ControllerDirs>,
}

/// Where the cgroups named in `proc_cgroup` (the text of `/proc/<pid>/cgroup`) are below `root`,
/// picking v1 or v2 per controller. On a hybrid host both appear; a v1 controller line wins when
/// that controller's hierarchy is mounted, since a controller is active in only one hierarchy at a
/// time.
pub fn membership(proc_cgroup: &str, root: &Path) -> Membership {
    let mut v2_path = None;
    let mut v1_memory = None;
    let mut v1_cpu = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path);
            continue;
        }
        let list: Vec<&str> = controllers.split(',').collect();
        if list.contains(&"memory") {
            v1_memory = v1_dirs(root, controllers, "memory", path);
        }
        if list.contains(&"cpu") {
            v1_cpu = v1_dirs(root, controllers, "cpu", path);
        }
    }
    let v2 = v2_path.map(|path| ControllerDirs::new(CgroupVersion::V2, unified_root(root), path));
    Membership { memory: v1_memory.or_else(|| v2.clone()), cpu: v1_cpu.or(v2) }
}

/// The v1 hierarchy directory for `controller` as a membership line names it: after the
/// comma-joined controller list (`cpu,cpuacct`), or after the controller alone (`cpu`, also how the
/// usual symlinks are named). `None` when the hierarchy is not mounted there.
fn v1_dirs(root: &Path, controllers: &str, controller: &str, path: &str) -> Option<ControllerDirs> {
    [controllers, controller]
        .into_iter()
        .map(|name| root.join(name))
        .find(|dir| dir.is_dir())
        .map(|hierarchy| ControllerDirs::new(CgroupVersion::V1, hierarchy, path))
}

/// kubelet's `--cgroup-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class, which decides where kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The classes with their own cgroup level (Guaranteed pods sit directly in the top level).
    const NESTED: [Qos; 2] = [Qos::Burstable, Qos::BestEffort];

    fn dir_name(self) -> &'static str {
        match self {
            Qos::Guaranteed => "",
            Qos::Burstable => "burstable",
            Qos::BestEffort => "besteffort",
        }
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Qos::Guaranteed => "guaranteed",
            q => q.dir_name(),
        })
    }
}

/// Where the pod cgroups of one kubelet are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    pub driver: Driver,
    /// The top-level pods cgroup relative to the hierarchy root: `kubepods.slice` (systemd) or
    /// `kubepods` (cgroupfs) unless kubelet runs with `--cgroup-root`. Under the systemd driver its
    /// last component must end in `.slice`, and the names below it are built from that name.
    pub base: PathBuf,
}

/// One pod's cgroup, as found on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodCgroup {
    /// The pod's UID in Kubernetes' form (with `-`), lower case.
    pub uid: String,
    pub qos: Qos,
    /// Relative to the hierarchy root.
    pub path: PathBuf,
}

impl Layout {
    pub fn systemd() -> Layout {
        Layout { driver: Driver::Systemd, base: PathBuf::from("kubepods.slice") }
    }

    pub fn cgroupfs() -> Layout {
        Layout { driver: Driver::Cgroupfs, base: PathBuf::from("kubepods") }
    }

    /// The layout of the kubelet on this node, found by its top-level cgroup; `None` while kubelet has
    /// not created it yet (the governor then has nothing to govern).
    pub fn detect(cgroups: &dyn Cgroups) -> Result<Option<Layout>, CgroupError> {
        let top = cgroups.children(Path::new(""))?;
        Ok([Layout::systemd(), Layout::cgroupfs()]
            .into_iter()
            .find(|layout| top.iter().any(|name| Path::new(name) == layout.base)))
    }

    /// The systemd unit prefix: the base slice's name without `.slice` (`kubepods`).
    fn prefix(&self) -> &str {
        let name = self.base.file_name().and_then(|n| n.to_str()).unwrap_or("kubepods");
        name.strip_suffix(".slice").unwrap_or(name)
    }

    /// The cgroup holding the pods of a QoS class (the base itself for Guaranteed).
    pub fn qos_dir(&self, qos: Qos) -> PathBuf {
        match (qos, self.driver) {
            (Qos::Guaranteed, _) => self.base.clone(),
            (q, Driver::Cgroupfs) => self.base.join(q.dir_name()),
            (q, Driver::Systemd) => self.base.join(format!("{}-{}.slice", self.prefix(), q.dir_name())),
        }
    }

    /// Where kubelet puts the cgroup of pod `uid` (either spelling) of class `qos`.
    pub fn pod_dir(&self, qos: Qos, uid: &str) -> PathBuf {
        let uid = normalize_uid(uid);
        let name = match (qos, self.driver) {
            (_, Driver::Cgroupfs) => format!("pod{uid}"),
            (Qos::Guaranteed, Driver::Systemd) => format!("{}-pod{}.slice", self.prefix(), uid.replace('-', "_")),
            (q, Driver::Systemd) => format!("{}-{}-pod{}.slice", self.prefix(), q.dir_name(), uid.replace('-', "_")),
        };
        self.qos_dir(qos).join(name)
    }

    /// The pod UID a cgroup named `name` in the directory of class `qos` belongs to, if it is a pod's.
    fn pod_uid(&self, qos: Qos, name: &str) -> Option<String> {
        let raw = match (qos, self.driver) {
            (_, Driver::Cgroupfs) => name.strip_prefix("pod")?,
            (Qos::Guaranteed, Driver::Systemd) => {
                name.strip_prefix(self.prefix())?.strip_prefix("-pod")?.strip_suffix(".slice")?
            }
            (q, Driver::Systemd) => name
                .strip_prefix(self.prefix())?
                .strip_prefix('-')?
                .strip_prefix(q.dir_name())?
                .strip_prefix("-pod")?
                .strip_suffix(".slice")?,
        };
        let valid = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| normalize_uid(raw))
    }
}

/// A pod UID in Kubernetes' spelling: systemd's `_` back to `-`, lower case.
pub fn normalize_uid(uid: &str) -> String {
    uid.replace('_', "-").to_ascii_lowercase()
}

/// Every pod cgroup under `layout`, sorted by UID. Pods of the same UID in two classes (a pod whose
/// class changed while kubelet was down) are both returned, Guaranteed first.
pub fn discover(cgroups: &dyn Cgroups, layout: &Layout) -> Result<Vec<PodCgroup>, CgroupError> {
    let mut pods = Vec::new();
    for qos in [Qos::Guaranteed].into_iter().chain(Qos::NESTED) {
        let dir = layout.qos_dir(qos);
        for name in cgroups.children(&dir)? {
            if let Some(uid) = layout.pod_uid(qos, &name) {
                pods.push(PodCgroup { uid, qos, path: dir.join(name) });
            }
        }
    }
    pods.sort();
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::V2;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    #[test]
    fn pod_paths_of_both_drivers() {
        let cases = [
            (
                Layout::systemd(),
                Qos::Guaranteed,
                "kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            ),
            (
                Layout::systemd(),
                Qos::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            ),
            (
                Layout::systemd(),
                Qos::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            ),
            (Layout::cgroupfs(), Qos::Guaranteed, "kubepods/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            (Layout::cgroupfs(), Qos::Burstable, "kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            (Layout::cgroupfs(), Qos::BestEffort, "kubepods/besteffort/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        ];
        for (layout, qos, want) in cases {
            assert_eq!(layout.pod_dir(qos, UID), Path::new(want), "{layout:?} {qos}");
            let dir = layout.qos_dir(qos);
            let name = Path::new(want).strip_prefix(&dir).unwrap().to_str().unwrap();
            assert_eq!(layout.pod_uid(qos, name).as_deref(), Some(UID), "{want}");
        }
    }

    #[test]
    fn names_that_are_not_pods_are_ignored() {
        let systemd = Layout::systemd();
        for name in [
            "kubepods-burstable.slice",
            "kubepods-besteffort.slice",
            "kubepods-pod.slice",
            "system.slice",
            "kubepods-burstable-pod1.slice",
        ] {
            assert_eq!(systemd.pod_uid(Qos::Guaranteed, name), None, "{name}");
        }
        assert_eq!(systemd.pod_uid(Qos::Burstable, "kubepods-besteffort-pod1.slice"), None);
        assert_eq!(Layout::cgroupfs().pod_uid(Qos::Guaranteed, "burstable"), None);
        assert_eq!(Layout::cgroupfs().pod_uid(Qos::Guaranteed, "pod../x"), None);
    }

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        for dir in dirs {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        root
    }

    #[test]
    fn discovers_every_class_under_the_systemd_driver() {
        let root = tree(&[
            "system.slice/k3s.service",
            "kubepods.slice/kubepods-podaaaa_1111.slice/cri-containerd-0123.scope",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podbbbb_2222.slice",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podcccc_3333.slice",
        ]);
        let cgroups = V2::new(root.path());
        let layout = Layout::detect(&cgroups).unwrap().unwrap();
        assert_eq!(layout, Layout::systemd());
        let pods = discover(&cgroups, &layout).unwrap();
        let found: Vec<_> = pods.iter().map(|p| (p.uid.as_str(), p.qos)).collect();
        assert_eq!(
            found,
            [("aaaa-1111", Qos::Guaranteed), ("bbbb-2222", Qos::Burstable), ("cccc-3333", Qos::BestEffort)]
        );
        assert_eq!(pods[0].path, Path::new("kubepods.slice/kubepods-podaaaa_1111.slice"));
    }

    #[test]
    fn discovers_every_class_under_the_cgroupfs_driver() {
        let root = tree(&[
            "kubepods/podaaaa-1111/0123",
            "kubepods/burstable/podbbbb-2222",
            "kubepods/besteffort/podcccc-3333",
        ]);
        let cgroups = V2::new(root.path());
        let layout = Layout::detect(&cgroups).unwrap().unwrap();
        assert_eq!(layout, Layout::cgroupfs());
        let paths: Vec<_> = discover(&cgroups, &layout).unwrap().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("kubepods/podaaaa-1111"),
                PathBuf::from("kubepods/burstable/podbbbb-2222"),
                PathBuf::from("kubepods/besteffort/podcccc-3333")
            ]
        );
    }

    #[test]
    fn no_kubelet_yet_means_no_layout() {
        let root = tree(&["system.slice"]);
        assert_eq!(Layout::detect(&V2::new(root.path())).unwrap(), None);
        let pods = discover(&V2::new(root.path()), &Layout::cgroupfs()).unwrap();
        assert!(pods.is_empty());
    }
}
