//! The cgroup governor on this machine's real cgroup v1 hierarchies (`/sys/fs/cgroup/{memory,pids,
//! cpu,cpuacct}`): each test builds a fake kubelet tree under a top-level cgroup of its own
//! (`kubepods-test-<pid>-<test>/{burstable,besteffort}/pod<uid>`, `.../pod<uid>` for Guaranteed, the
//! cgroupfs driver's layout), places real processes in the pod cgroups the way kubelet would (the test
//! writes their pid to `cgroup.procs`; the governor never does) and checks what the kernel does with
//! the limits the governor wrote. Everything is killed and removed on drop, panics included.
//!
//! On a pure cgroup v2 host (`/sys/fs/cgroup/cgroup.controllers` exists) the same three scenarios
//! run against the unified hierarchy instead (the `*_on_v2` tests): the fake kubelet tree is
//! created under `/sys/fs/cgroup` with the cpu, memory and pids controllers enabled for its
//! subtree, and the kernel's answers are read from the v2 files (`memory.max`, `memory.events`,
//! `pids.max`, `pids.events`, `cpu.max`). Each flavour skips, saying why, on a host of the other.
//!
//! These need root and the controllers; anywhere else they print why and pass. cgroup v2 paths and
//! files are also checked against fixture roots by the unit tests of `hexa_agent::cgroup`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use hexa_agent::isolation::cgroup::{
    Driver, Governor, GovernorSettings, Layout, Limit, PodTenant, PolicySettings, Qos, Reconcile, TenantUsage,
    UnknownTenantCap, V1, V2,
};
use hexa_shared::spec::TenantAllocation;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const MIB: u64 = 1 << 20;

/// A fake kubelet tree in every v1 hierarchy the governor uses, and the processes placed in it.
struct FakeNode {
    base: String,
    /// The distinct hierarchy directories (co-mounted controllers appear once).
    hierarchies: Vec<PathBuf>,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    pods: Vec<PathBuf>,
    children: Vec<Child>,
    /// The tree is in the unified (v2) hierarchy: `hierarchies` is its root alone.
    unified: bool,
}

/// The controllers the governor needs, as v2 names them in `cgroup.subtree_control`.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl FakeNode {
    /// `None` (after saying why, naming `test`) when this machine cannot run the test; the tree is
    /// `kubepods-test-<pid>-<tag>`.
    fn new(test: &str, tag: &str) -> Option<FakeNode> {
        if !Uid::effective().is_root() {
            eprintln!("skipping {test}: creating cgroups and placing processes in them needs root");
            return None;
        }
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            eprintln!(
                "skipping {test}: {CGROUP_ROOT} is a pure cgroup v2 mount; this test drives the v1 controllers \
                 (its `_on_v2` twin runs against v2 instead)"
            );
            return None;
        }
        let v1 = match V1::new(root) {
            Ok(v1) => v1,
            Err(e) => {
                eprintln!("skipping {test}: the cgroup v1 controllers are not all mounted: {e}");
                return None;
            }
        };
        let mut hierarchies = Vec::new();
        for dir in [v1.memory_dir(), v1.pids_dir(), v1.cpu_dir(), v1.cpuacct_dir()] {
            let dir = dir.canonicalize().unwrap();
            if !hierarchies.contains(&dir) {
                hierarchies.push(dir);
            }
        }
        remove_stale_trees(&hierarchies);
        let base = format!("kubepods-test-{}-{tag}", std::process::id());
        for hierarchy in &hierarchies {
            fs::create_dir(hierarchy.join(&base)).unwrap();
        }
        Some(FakeNode {
            base,
            memory: v1.memory_dir().canonicalize().unwrap(),
            pids: v1.pids_dir().canonicalize().unwrap(),
            cpu: v1.cpu_dir().canonicalize().unwrap(),
            hierarchies,
            pods: Vec::new(),
            children: Vec::new(),
            unified: false,
        })
    }

    /// The same on a pure cgroup v2 host: the tree is `/sys/fs/cgroup/kubepods-test-<pid>-<tag>`,
    /// with the cpu, memory and pids controllers enabled down to the pods' parents. `None` (after
    /// saying why) anywhere else.
    fn new_v2(test: &str, tag: &str) -> Option<FakeNode> {
        if !Uid::effective().is_root() {
            eprintln!("skipping {test}: creating cgroups and placing processes in them needs root");
            return None;
        }
        let root = Path::new(CGROUP_ROOT);
        let Ok(available) = fs::read_to_string(root.join("cgroup.controllers")) else {
            eprintln!(
                "skipping {test}: {CGROUP_ROOT} is not a pure cgroup v2 mount (no cgroup.controllers); \
                 the v1 tests of this file run instead"
            );
            return None;
        };
        let available: Vec<&str> = available.split_whitespace().collect();
        if let Some(missing) = V2_CONTROLLERS.iter().find(|c| !available.contains(c)) {
            eprintln!("skipping {test}: the cgroup v2 `{missing}` controller is not available in {CGROUP_ROOT}");
            return None;
        }
        if let Err(e) = enable_v2_controllers(root) {
            eprintln!("skipping {test}: cannot enable the cpu, memory and pids controllers below {CGROUP_ROOT}: {e}");
            return None;
        }
        let hierarchies = vec![root.to_path_buf()];
        remove_stale_trees(&hierarchies);
        let base = format!("kubepods-test-{}-{tag}", std::process::id());
        fs::create_dir(root.join(&base)).unwrap();
        enable_v2_controllers(&root.join(&base)).unwrap();
        Some(FakeNode {
            base,
            memory: root.to_path_buf(),
            pids: root.to_path_buf(),
            cpu: root.to_path_buf(),
            hierarchies,
            pods: Vec::new(),
            children: Vec::new(),
            unified: true,
        })
    }

    fn layout(&self) -> Layout {
        Layout { driver: Driver::Cgroupfs, base: PathBuf::from(&self.base) }
    }

    fn governor(&self) -> Governor {
        self.governor_with(GovernorSettings::default())
    }

    fn governor_with(&self, settings: GovernorSettings) -> Governor {
        let settings = GovernorSettings { layout: Some(self.layout()), ..settings };
        if self.unified {
            return Governor::new(Box::new(V2::new(Path::new(CGROUP_ROOT))), settings);
        }
        Governor::new(Box::new(V1::new(Path::new(CGROUP_ROOT)).unwrap()), settings)
    }

    /// Creates the pod's cgroup in every hierarchy, as kubelet would; returns its relative path.
    fn add_pod(&mut self, qos: Qos, uid: &str) -> PathBuf {
        let pod = self.layout().pod_dir(qos, uid);
        if self.unified {
            // Each level between the tree and the pod passes the controllers on, as kubelet's do.
            let root = &self.hierarchies[0];
            let mut level = root.join(&self.base);
            for part in pod.strip_prefix(&self.base).unwrap().components() {
                let parent = level.clone();
                level = level.join(part);
                if !level.exists() {
                    if parent != root.join(&self.base) {
                        enable_v2_controllers(&parent).unwrap();
                    }
                    fs::create_dir(&level).unwrap();
                }
            }
            self.pods.push(pod.clone());
            return pod;
        }
        for hierarchy in &self.hierarchies {
            fs::create_dir_all(hierarchy.join(&pod)).unwrap();
        }
        self.pods.push(pod.clone());
        pod
    }

    /// Starts `python3 -c program` inside `pod`: a shell writes its own pid to the pod's `cgroup.procs`
    /// in every hierarchy, then becomes python.
    fn spawn(&mut self, pod: &Path, program: &str) -> &mut Child {
        let procs: Vec<PathBuf> = self.hierarchies.iter().map(|h| h.join(pod).join("cgroup.procs")).collect();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"for f in "$@"; do echo $$ > "$f" || exit 97; done; exec python3 -c "$PROGRAM""#)
            .arg("sh")
            .args(&procs)
            .env("PROGRAM", program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    fn read(&self, hierarchy: &Path, pod: &Path, file: &str) -> String {
        fs::read_to_string(hierarchy.join(pod).join(file)).unwrap().trim().to_string()
    }

    fn memory_file(&self, pod: &Path, file: &str) -> String {
        self.read(&self.memory, pod, file)
    }

    fn keyed(&self, hierarchy: &Path, pod: &Path, file: &str, key: &str) -> Option<u64> {
        self.read(hierarchy, pod, file).lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
    }

    /// The pod's CPU quota per period in microseconds, from `cpu.max` (v2) or `cpu.cfs_quota_us` (v1).
    fn cpu_quota(&self, pod: &Path) -> u64 {
        if self.unified { self.cpu_max_quota(pod) } else { self.cfs_quota(pod) }
    }

    fn cfs_quota(&self, pod: &Path) -> u64 {
        self.read(&self.cpu, pod, "cpu.cfs_quota_us").parse().unwrap()
    }

    /// v2: the quota of `cpu.max` (`<quota> <period>`), in microseconds.
    fn cpu_max_quota(&self, pod: &Path) -> u64 {
        let cpu_max = self.read(&self.cpu, pod, "cpu.max");
        let quota = cpu_max.split_whitespace().next().unwrap();
        quota.parse().unwrap_or_else(|_| panic!("{} cpu.max is {cpu_max:?}", pod.display()))
    }

    /// v2: a counter of `memory.events` (`max`: times usage hit memory.max; `oom_kill`: processes
    /// the OOM killer killed in the cgroup).
    fn memory_event(&self, pod: &Path, event: &str) -> u64 {
        self.keyed(&self.memory, pod, "memory.events", &format!("{event} ")).unwrap()
    }
}

/// Turns on the cpu, memory and pids controllers for the children of the v2 cgroup `dir`.
fn enable_v2_controllers(dir: &Path) -> std::io::Result<()> {
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control"))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let wanted: Vec<String> = V2_CONTROLLERS.iter().filter(|c| !enabled.contains(c)).map(|c| format!("+{c}")).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        // Kill first (everything in the pods, forked grandchildren included), then remove leaf to root.
        for hierarchy in &self.hierarchies {
            kill_all_in(&hierarchy.join(&self.base));
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for hierarchy in &self.hierarchies {
            remove_tree(&hierarchy.join(&self.base));
        }
    }
}

/// SIGKILLs every process in `dir` and the cgroups below it until none is left.
fn kill_all_in(dir: &Path) {
    for _ in 0..2000 {
        let mut any = false;
        for cgroup in cgroups_below(dir) {
            for pid in fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    any = true;
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if !any {
            return;
        }
        sleep(Duration::from_millis(5));
    }
}

/// `dir` and every cgroup below it, parents first.
fn cgroups_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroups_below(&entry.path()));
            }
        }
    }
    out
}

/// Removes a cgroup tree leaf to root; a cgroup whose last process is still exiting gets a moment.
fn remove_tree(dir: &Path) {
    for cgroup in cgroups_below(dir).into_iter().rev() {
        for _ in 0..200 {
            match fs::remove_dir(&cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Trees left by a test run that was killed outright (its pid no longer exists).
fn remove_stale_trees(hierarchies: &[PathBuf]) {
    for hierarchy in hierarchies {
        for entry in fs::read_dir(hierarchy).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(pid) = name.strip_prefix("kubepods-test-").and_then(|r| r.split('-').next()) else { continue };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                kill_all_in(&entry.path());
                remove_tree(&entry.path());
            }
        }
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process {} still running after {limit:?}", child.id());
        sleep(Duration::from_millis(20));
    }
}

/// An allocation as the coordinator decides it: `pids` is its pids cap (the coordinator's
/// `max(pods, 1) × pids_per_pod`).
fn allocation(tenant: &str, cpu_millis: u64, memory_bytes: u64, pods: u32, pids: u64) -> TenantAllocation {
    TenantAllocation { tenant: tenant.into(), cpu_millis, memory_bytes, pods, pids: Some(pids), control_plane: false }
}

fn pod_tenant(uid: &str, tenant: &str) -> PodTenant {
    PodTenant { pod_uid: uid.into(), tenant: tenant.into() }
}

fn usage_of<'a>(reconcile: &'a Reconcile, tenant: &str) -> &'a TenantUsage {
    reconcile.usage.iter().find(|u| u.tenant == tenant).unwrap()
}

fn assert_clean(reconcile: &Reconcile) {
    assert!(reconcile.failures.is_empty(), "{:?}", reconcile.failures);
}

/// A python program that allocates `mib` MiB one at a time (touching every page), prints `holding`
/// and keeps them for `hold_secs`.
fn allocate(mib: u64, hold_secs: u64) -> String {
    format!(
        "import time\nheld = []\nfor _ in range({mib}):\n    held.append(b'x' * (1 << 20))\n\
         print('holding', flush=True)\ntime.sleep({hold_secs})\n"
    )
}

#[test]
fn the_tenant_over_its_memory_share_is_oom_killed_and_the_other_is_not() {
    let Some(mut node) = FakeNode::new("the_tenant_over_its_memory_share_is_oom_killed_and_the_other_is_not", "oom")
    else {
        return;
    };
    let a = node.add_pod(Qos::Burstable, "0000000a-0000-4000-8000-000000000001");
    let b = node.add_pod(Qos::Guaranteed, "0000000b-0000-4000-8000-000000000001");
    let system = node.add_pod(Qos::BestEffort, "00000005-0000-4000-8000-000000000001");
    let allocations = [allocation("tenant-a", 1000, 64 * MIB, 1, 256), allocation("tenant-b", 1000, 64 * MIB, 1, 256)];
    let pods = [
        pod_tenant("0000000a-0000-4000-8000-000000000001", "tenant-a"),
        pod_tenant("0000000b-0000-4000-8000-000000000001", "tenant-b"),
        // The system pod is in no tenant's namespace: the pod list names no tenant for it.
    ];
    let mut governor = node.governor();

    let first = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&first);
    for pod in [&a, &b] {
        assert_eq!(node.memory_file(pod, "memory.limit_in_bytes"), (64 * MIB).to_string());
    }
    let unlimited = node.memory_file(&system, "memory.limit_in_bytes");
    assert!(unlimited.parse::<u64>().unwrap() > 1 << 62, "the system pod keeps no limit, has {unlimited}");
    assert!(first.writes.iter().all(|w| !w.path.to_string_lossy().contains("00000005")), "system pod written");
    let again = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_eq!(again.writes, [], "a reconcile with no change writes nothing");

    // tenant-b holds 24 MiB (plus the interpreter), under its 64 MiB share, for the whole test.
    let survivor = node.spawn(&b, &allocate(24, 600));
    let mut line = String::new();
    BufReader::new(survivor.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "holding", "tenant-b's process died before holding its memory");
    // tenant-a tries for 200 MiB.
    let hog = node.spawn(&a, &allocate(200, 0));
    let hog_status = wait_for(hog, Duration::from_secs(60));
    eprintln!("tenant-a's 200 MiB process: {hog_status:?}");
    assert_eq!(hog_status.signal(), Some(Signal::SIGKILL as i32), "tenant-a's process was not SIGKILLed");
    let failcnt: u64 = node.memory_file(&a, "memory.failcnt").parse().unwrap();
    let oom_kills = node.keyed(&node.memory, &a, "memory.oom_control", "oom_kill ");
    eprintln!(
        "tenant-a: memory.failcnt {failcnt}, memory.max_usage_in_bytes {}, oom_control oom_kill {oom_kills:?}",
        node.memory_file(&a, "memory.max_usage_in_bytes")
    );
    assert!(failcnt > 0, "tenant-a never hit its limit");
    if let Some(kills) = oom_kills {
        assert!(kills >= 1, "the kernel reports no OOM kill in tenant-a's pod");
    }

    let during = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&during);
    let b_usage = usage_of(&during, "tenant-b");
    eprintln!("usage while tenant-b holds its memory: {:?}", during.usage);
    assert!(b_usage.memory_bytes >= 24 * MIB && b_usage.memory_bytes < 64 * MIB, "{b_usage:?}");
    assert!(b_usage.pids >= 1);
    assert_eq!(node.keyed(&node.memory, &b, "memory.oom_control", "oom_kill "), oom_kills.map(|_| 0));

    // tenant-b's process lives on: it is still in its pod when we look, then killed on drop.
    let survivor = &mut node.children[0];
    assert_eq!(survivor.try_wait().unwrap(), None, "tenant-b's process died");
    assert_eq!(node.memory_file(&b, "memory.failcnt"), "0", "tenant-b hit its limit");
}

#[test]
fn a_fork_bomb_stops_at_the_pids_cap() {
    let Some(mut node) = FakeNode::new("a_fork_bomb_stops_at_the_pids_cap", "forkbomb") else { return };
    let uid = "0000000c-0000-4000-8000-000000000001";
    let pod = node.add_pod(Qos::Burstable, uid);
    let pids = 16;
    let mut governor = node.governor();
    let out = governor
        .reconcile(&[allocation("tenant-c", 1000, 512 * MIB, 1, pids)], &[pod_tenant(uid, "tenant-c")], Instant::now())
        .unwrap();
    assert_clean(&out);
    let cap: u64 = node.read(&node.pids, &pod, "pids.max").parse().unwrap();
    assert_eq!(cap, pids, "the allocation's pids cap, {pids}");

    // Every process forks for ever; a failed fork waits 5 ms and tries again.
    let bomb = r#"
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.005)
"#;
    node.spawn(&pod, bomb);
    let started = Instant::now();
    let (mut most_current, mut most_procs) = (0u64, 0usize);
    while started.elapsed() < Duration::from_secs(3) {
        let current: u64 = node.read(&node.pids, &pod, "pids.current").parse().unwrap();
        let procs = node.read(&node.pids, &pod, "cgroup.procs").lines().count();
        assert!(current <= cap && procs as u64 <= cap, "{current} pids, {procs} processes in a pod capped at {cap}");
        most_current = most_current.max(current);
        most_procs = most_procs.max(procs);
        sleep(Duration::from_millis(5));
    }
    let refused = node.keyed(&node.pids, &pod, "pids.events", "max ");
    eprintln!(
        "fork bomb: at most {most_current} pids / {most_procs} processes against pids.max {cap}; \
         forks refused: {refused:?}"
    );
    assert_eq!(most_current, cap, "the bomb never reached the cap");
    if let Some(refused) = refused {
        assert!(refused > 0, "pids.events reports no refused fork");
    }
    let report = governor
        .reconcile(&[allocation("tenant-c", 1000, 512 * MIB, 1, pids)], &[pod_tenant(uid, "tenant-c")], Instant::now())
        .unwrap();
    assert!(usage_of(&report, "tenant-c").pids <= cap);
}

#[test]
fn the_cpu_split_sums_to_the_tenant_quota() {
    let Some(node) = FakeNode::new("the_cpu_split_sums_to_the_tenant_quota", "cpusplit") else { return };
    cpu_split_sums_to_the_tenant_quota(node);
}

/// The cpu split scenario, on either hierarchy.
fn cpu_split_sums_to_the_tenant_quota(mut node: FakeNode) {
    let (busy_uid, light_uid) = ("0000000d-0000-4000-8000-000000000001", "0000000d-0000-4000-8000-000000000002");
    let busy = node.add_pod(Qos::Burstable, busy_uid);
    let light = node.add_pod(Qos::BestEffort, light_uid);
    // 0.3 CPU for the tenant (30 ms per 100 ms period): small enough that its pods press against it
    // even on a busy 2-CPU machine.
    let allocations = [allocation("tenant-d", 300, 256 * MIB, 2, 2 * 64)];
    let tenant_quota = 30_000;
    let pods = [pod_tenant(busy_uid, "tenant-d"), pod_tenant(light_uid, "tenant-d")];
    let mut governor = node.governor();
    let first = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&first);
    assert_eq!((node.cpu_quota(&busy), node.cpu_quota(&light)), (tenant_quota, tenant_quota), "each pod at the share");

    // One pod spins; the other works about 30% of the time.
    node.spawn(&busy, "while True: pass");
    let light_work = r#"
import time
while True:
    t = time.monotonic()
    while time.monotonic() - t < 0.003:
        pass
    time.sleep(0.007)
"#;
    node.spawn(&light, light_work);

    // Together they want over a CPU against 0.3: the next reconciles split the quota by demand.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut splits = 0;
    while splits < 2 {
        assert!(Instant::now() < deadline, "the tenant's quota was never split");
        sleep(Duration::from_millis(1500));
        let out = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
        assert_clean(&out);
        let usage = usage_of(&out, "tenant-d");
        let (q_busy, q_light) = (node.cpu_quota(&busy), node.cpu_quota(&light));
        eprintln!(
            "tenant-d used {} millicpu (share 300); split {}; quota busy {q_busy} + light {q_light} = {}",
            usage.cpu_millis,
            usage.cpu_split,
            q_busy + q_light
        );
        if !usage.cpu_split {
            continue;
        }
        splits += 1;
        assert_eq!(q_busy + q_light, tenant_quota, "the split must sum to the tenant's quota");
        assert!(q_busy >= 1000 && q_light >= 1000, "a pod starved");
        assert!(q_busy > q_light, "the busier pod should get the larger part");
        if splits == 2 {
            // Under the split the tenant as a whole stays within its share (CFS enforces each period).
            assert!(usage.cpu_millis <= 300 * 5 / 4, "tenant-d used {} millicpu against 300", usage.cpu_millis);
        }
    }
    // Both pods' memory limits together are the tenant's 256 MiB (the kernel rounds each down to
    // its page size), not 256 MiB each.
    let memory_max = |pod: &Path| match governor.cgroups().limits(pod).unwrap().memory_max {
        Limit::Value(v) => v,
        Limit::Max => u64::MAX,
    };
    let together = memory_max(&busy).saturating_add(memory_max(&light));
    assert!(together <= 256 * MIB && together > 255 * MIB, "the pods' limits add up to {together}");
}

// The same scenarios on the unified hierarchy (pure cgroup v2 hosts).

#[test]
fn the_tenant_over_its_memory_share_is_oom_killed_and_the_other_is_not_on_v2() {
    let test = "the_tenant_over_its_memory_share_is_oom_killed_and_the_other_is_not_on_v2";
    let Some(mut node) = FakeNode::new_v2(test, "oom") else { return };
    let a = node.add_pod(Qos::Burstable, "0000000a-0000-4000-8000-000000000001");
    let b = node.add_pod(Qos::Guaranteed, "0000000b-0000-4000-8000-000000000001");
    let system = node.add_pod(Qos::BestEffort, "00000005-0000-4000-8000-000000000001");
    let allocations = [allocation("tenant-a", 1000, 64 * MIB, 1, 256), allocation("tenant-b", 1000, 64 * MIB, 1, 256)];
    let pods = [
        pod_tenant("0000000a-0000-4000-8000-000000000001", "tenant-a"),
        pod_tenant("0000000b-0000-4000-8000-000000000001", "tenant-b"),
        // The system pod is in no tenant's namespace: the pod list names no tenant for it.
    ];
    let mut governor = node.governor();

    let first = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&first);
    for pod in [&a, &b] {
        assert_eq!(node.memory_file(pod, "memory.max"), (64 * MIB).to_string());
    }
    assert_eq!(node.memory_file(&system, "memory.max"), "max", "the system pod keeps no limit");
    assert!(first.writes.iter().all(|w| !w.path.to_string_lossy().contains("00000005")), "system pod written");
    let again = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_eq!(again.writes, [], "a reconcile with no change writes nothing");

    // tenant-b holds 24 MiB (plus the interpreter), under its 64 MiB share, for the whole test.
    let survivor = node.spawn(&b, &allocate(24, 600));
    let mut line = String::new();
    BufReader::new(survivor.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "holding", "tenant-b's process died before holding its memory");
    // tenant-a tries for 200 MiB.
    let hog = node.spawn(&a, &allocate(200, 0));
    let hog_status = wait_for(hog, Duration::from_secs(60));
    eprintln!("tenant-a's 200 MiB process: {hog_status:?}");
    assert_eq!(hog_status.signal(), Some(Signal::SIGKILL as i32), "tenant-a's process was not SIGKILLed");
    let (hit_max, oom_kills) = (node.memory_event(&a, "max"), node.memory_event(&a, "oom_kill"));
    eprintln!(
        "tenant-a: memory.events max {hit_max}, oom_kill {oom_kills}, memory.peak {:?}",
        fs::read_to_string(node.memory.join(&a).join("memory.peak")).ok().map(|p| p.trim().to_string())
    );
    assert!(hit_max > 0, "tenant-a never hit its limit");
    assert!(oom_kills >= 1, "the kernel reports no OOM kill in tenant-a's pod");

    let during = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&during);
    let b_usage = usage_of(&during, "tenant-b");
    eprintln!("usage while tenant-b holds its memory: {:?}", during.usage);
    assert!(b_usage.memory_bytes >= 24 * MIB && b_usage.memory_bytes < 64 * MIB, "{b_usage:?}");
    assert!(b_usage.pids >= 1);
    assert_eq!(node.memory_event(&b, "oom_kill"), 0);

    // tenant-b's process lives on: it is still in its pod when we look, then killed on drop.
    let survivor = &mut node.children[0];
    assert_eq!(survivor.try_wait().unwrap(), None, "tenant-b's process died");
    assert_eq!(node.memory_event(&b, "max"), 0, "tenant-b hit its limit");
}

#[test]
fn a_fork_bomb_stops_at_the_pids_cap_on_v2() {
    let Some(mut node) = FakeNode::new_v2("a_fork_bomb_stops_at_the_pids_cap_on_v2", "forkbomb") else { return };
    let uid = "0000000c-0000-4000-8000-000000000001";
    let pod = node.add_pod(Qos::Burstable, uid);
    let pids = 16;
    let mut governor = node.governor();
    let out = governor
        .reconcile(&[allocation("tenant-c", 1000, 512 * MIB, 1, pids)], &[pod_tenant(uid, "tenant-c")], Instant::now())
        .unwrap();
    assert_clean(&out);
    let cap: u64 = node.read(&node.pids, &pod, "pids.max").parse().unwrap();
    assert_eq!(cap, pids, "the allocation's pids cap, {pids}");

    // Every process forks for ever; a failed fork waits 5 ms and tries again.
    let bomb = r#"
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.005)
"#;
    node.spawn(&pod, bomb);
    let started = Instant::now();
    let (mut most_current, mut most_procs) = (0u64, 0usize);
    while started.elapsed() < Duration::from_secs(3) {
        let current: u64 = node.read(&node.pids, &pod, "pids.current").parse().unwrap();
        let procs = node.read(&node.pids, &pod, "cgroup.procs").lines().count();
        assert!(current <= cap && procs as u64 <= cap, "{current} pids, {procs} processes in a pod capped at {cap}");
        most_current = most_current.max(current);
        most_procs = most_procs.max(procs);
        sleep(Duration::from_millis(5));
    }
    let refused = node.keyed(&node.pids, &pod, "pids.events", "max ");
    eprintln!(
        "fork bomb: at most {most_current} pids / {most_procs} processes against pids.max {cap}; \
         forks refused: {refused:?}"
    );
    assert_eq!(most_current, cap, "the bomb never reached the cap");
    assert!(refused.is_some_and(|refused| refused > 0), "pids.events reports no refused fork");
    let report = governor
        .reconcile(&[allocation("tenant-c", 1000, 512 * MIB, 1, pids)], &[pod_tenant(uid, "tenant-c")], Instant::now())
        .unwrap();
    assert!(usage_of(&report, "tenant-c").pids <= cap);
}

#[test]
fn the_cpu_split_sums_to_the_tenant_quota_on_v2() {
    let Some(node) = FakeNode::new_v2("the_cpu_split_sums_to_the_tenant_quota_on_v2", "cpusplit") else { return };
    cpu_split_sums_to_the_tenant_quota(node);
}

/// The memory limit the kernel has for `pod`, on either hierarchy.
fn memory_limit(node: &FakeNode, pod: &Path) -> u64 {
    let file = if node.unified { "memory.max" } else { "memory.limit_in_bytes" };
    node.memory_file(pod, file).parse().unwrap_or(u64::MAX)
}

/// Two pods of one tenant that together want more than its share, and a pod of a tenant with no
/// allocation on the node, on either hierarchy.
fn pods_are_held_to_the_share_together(mut node: FakeNode) {
    let (holder_uid, hog_uid) = ("0000000f-0000-4000-8000-000000000001", "0000000f-0000-4000-8000-000000000002");
    let stranger_uid = "00000001-0000-4000-8000-0000000000aa";
    let holder = node.add_pod(Qos::Burstable, holder_uid);
    let hog = node.add_pod(Qos::Burstable, hog_uid);
    let stranger = node.add_pod(Qos::BestEffort, stranger_uid);
    let share = 128 * MIB;
    let allocations = [allocation("tenant-f", 1000, share, 2, 256)];
    let pods =
        [pod_tenant(holder_uid, "tenant-f"), pod_tenant(hog_uid, "tenant-f"), pod_tenant(stranger_uid, "tenant-u")];
    let unknown = UnknownTenantCap { cpu_millis: 250, memory_bytes: 48 * MIB, pids: 64 };
    let settings = GovernorSettings {
        policy: PolicySettings { unknown_tenant: unknown, ..Default::default() },
        ..Default::default()
    };
    let mut governor = node.governor_with(settings);

    // One pod holds 64 MiB (plus the interpreter) for the whole test; the governor then looks.
    let holding = node.spawn(&holder, &allocate(64, 600));
    let mut line = String::new();
    BufReader::new(holding.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "holding", "the holder died before holding its memory");
    let held = governor.reconcile(&allocations, &pods, Instant::now()).unwrap();
    assert_clean(&held);
    let limits = [memory_limit(&node, &holder), memory_limit(&node, &hog)];
    eprintln!(
        "limits with the holder at {} bytes: {limits:?} (share {share})",
        usage_of(&held, "tenant-f").memory_bytes
    );
    // The kernel may round a limit down to its page size; never up.
    assert!(limits.iter().sum::<u64>() <= share, "the pods' limits add up to more than the share: {limits:?}");
    assert!(limits[0] >= 64 * MIB, "the holder is squeezed below what it holds: {limits:?}");

    // The other pod now tries for 100 MiB: under the old per-pod cap it would get it and the tenant
    // would hold 164 MiB of its 128; held to the share together, it is killed.
    let wanting = node.spawn(&hog, &allocate(100, 0));
    let status = wait_for(wanting, Duration::from_secs(60));
    eprintln!("the second pod's 100 MiB process: {status:?}");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "the second pod got past the tenant's share");
    let holding = &mut node.children[0];
    assert_eq!(holding.try_wait().unwrap(), None, "the holder died");

    // A pod of a tenant with no allocation here is held to the configured default.
    assert_eq!(memory_limit(&node, &stranger), 48 * MIB);
    assert_eq!(node.read(&node.pids, &stranger, "pids.max"), "64");
    let stranger_hog = node.spawn(&stranger, &allocate(100, 0));
    let status = wait_for(stranger_hog, Duration::from_secs(60));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "an unknown tenant's pod ran past the default");
}

#[test]
fn a_tenant_s_pods_are_held_to_its_share_together() {
    let Some(node) = FakeNode::new("a_tenant_s_pods_are_held_to_its_share_together", "together") else { return };
    pods_are_held_to_the_share_together(node);
}

#[test]
fn a_tenant_s_pods_are_held_to_its_share_together_on_v2() {
    let Some(node) = FakeNode::new_v2("a_tenant_s_pods_are_held_to_its_share_together_on_v2", "together") else {
        return;
    };
    pods_are_held_to_the_share_together(node);
}
