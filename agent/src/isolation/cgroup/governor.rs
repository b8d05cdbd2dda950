//! One reconcile: find the pod cgroups, sample the governed ones, decide, write what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hexa_shared::spec::TenantAllocation;
use tracing::{debug, info, info_span, warn};

use super::policy::{self, PodSample, PolicySettings, TenantUsage};
use super::{CgroupError, Cgroups, FileWrite};
use crate::cgroup::discover::{self, Layout, normalize_uid};

/// How the governor finds and treats pods; [`Default`] is production's. What each tenant may use
/// is not a setting here: it is the allocation in the node's spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GovernorSettings {
    /// Where kubelet's pod cgroups are; `None` detects `kubepods.slice` (systemd driver) or `kubepods`
    /// (cgroupfs driver) at each reconcile until one exists.
    pub layout: Option<Layout>,
    pub policy: PolicySettings,
}

/// A pod of this node and the tenant it belongs to, from the node's pod list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodTenant {
    /// Either spelling (`-` or systemd's `_`).
    pub pod_uid: String,
    pub tenant: String,
}

/// A governed pod the governor could not sample or limit in this reconcile; the others went ahead.
#[derive(Debug)]
pub struct PodFailure {
    pub pod_uid: String,
    pub tenant: String,
    pub cgroup: PathBuf,
    pub error: CgroupError,
}

/// What one reconcile found and did.
#[derive(Debug, Default)]
pub struct Reconcile {
    /// The kubelet layout in use; `None` when no pods cgroup exists yet (nothing was governed).
    pub layout: Option<Layout>,
    /// One entry per tenant with a share, sorted by tenant.
    pub usage: Vec<TenantUsage>,
    /// Every file written, in order; empty when nothing had to change.
    pub writes: Vec<FileWrite>,
    pub failures: Vec<PodFailure>,
    /// Pods of governed tenants in the pod list that have no cgroup here (not started yet, or gone).
    pub absent: Vec<String>,
}

/// The cgroup governor of one node. Keeps, between reconciles, only each pod's cpu counter and the
/// time of the last reconcile, to measure recent demand.
#[derive(Debug)]
pub struct Governor {
    cgroups: Box<dyn Cgroups>,
    settings: GovernorSettings,
    last: Option<Instant>,
    /// Per pod UID: its cgroup and its cpu counter at the last reconcile.
    cpu: BTreeMap<String, (PathBuf, u64)>,
}

impl Governor {
    pub fn new(cgroups: Box<dyn Cgroups>, settings: GovernorSettings) -> Governor {
        Governor { cgroups, settings, last: None, cpu: BTreeMap::new() }
    }

    /// A governor over the cgroups mounted at `root` (`/sys/fs/cgroup` in production), v2 or v1.
    pub fn open(root: &Path, settings: GovernorSettings) -> Result<Governor, CgroupError> {
        Ok(Governor::new(super::open(root)?, settings))
    }

    pub fn cgroups(&self) -> &dyn Cgroups {
        &*self.cgroups
    }

    /// Enforces the coordinator's allocations on this node (`NodeSpec::tenants`), exactly as they
    /// are, on the pods of `pods` found here; tenants without an allocation are not touched. `now`
    /// is when the samples are taken (the cpu demand is measured from one reconcile to the next).
    /// Fails only when the pod cgroups cannot be listed; a pod that cannot be read or limited is
    /// reported in [`Reconcile::failures`] and the others are still governed.
    pub fn reconcile(
        &mut self,
        allocations: &[TenantAllocation],
        pods: &[PodTenant],
        now: Instant,
    ) -> Result<Reconcile, CgroupError> {
        let span = info_span!("cgroup_reconcile", tenants = allocations.len(), pods = pods.len());
        let _entered = span.enter();

        let layout = match &self.settings.layout {
            Some(layout) => Some(layout.clone()),
            None => Layout::detect(&*self.cgroups)?,
        };
        // Every tenant pod is governed: with its tenant's allocation, or the unknown-tenant default.
        let tenant_of: BTreeMap<String, &str> =
            pods.iter().map(|p| (normalize_uid(&p.pod_uid), p.tenant.as_str())).collect();
        let mut found = match &layout {
            Some(layout) => discover::discover(&*self.cgroups, layout)?,
            None => Vec::new(),
        };
        // The same pod under two QoS classes (its class changed while kubelet was down): the first.
        found.dedup_by(|b, a| a.uid == b.uid);

        let mut out = Reconcile { layout, ..Reconcile::default() };
        let mut samples = Vec::new();
        let mut cgroup_of = BTreeMap::new();
        let mut cpu_now = BTreeMap::new();
        for pod in &found {
            let Some(&tenant) = tenant_of.get(&pod.uid) else { continue };
            match self.cgroups.usage(&pod.path) {
                Ok(usage) => {
                    let delta = self
                        .cpu
                        .get(&pod.uid)
                        .filter(|(path, _)| *path == pod.path)
                        .and_then(|&(_, before)| usage.cpu_usage_usec.checked_sub(before));
                    cpu_now.insert(pod.uid.clone(), (pod.path.clone(), usage.cpu_usage_usec));
                    cgroup_of.insert(pod.uid.clone(), (pod.path.clone(), tenant));
                    samples.push(PodSample {
                        uid: pod.uid.clone(),
                        tenant: tenant.to_string(),
                        usage,
                        cpu_delta_usec: delta,
                    });
                }
                // Deleted between listing and reading: the pod is gone, not failing.
                Err(CgroupError::Read { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => out.failures.push(PodFailure {
                    pod_uid: pod.uid.clone(),
                    tenant: tenant.to_string(),
                    cgroup: pod.path.clone(),
                    error,
                }),
            }
        }
        let seen: BTreeSet<&str> = found.iter().map(|p| p.uid.as_str()).collect();
        out.absent = tenant_of.keys().filter(|uid| !seen.contains(uid.as_str())).cloned().collect();

        let interval_usec =
            self.last.map(|last| u64::try_from(now.saturating_duration_since(last).as_micros()).unwrap_or(u64::MAX));
        let plan = policy::plan(allocations, &samples, interval_usec, &self.settings.policy);
        for (uid, limits) in &plan.limits {
            let Some((path, tenant)) = cgroup_of.get(uid) else { continue };
            match self.cgroups.apply(path, limits) {
                Ok(writes) => {
                    for write in &writes {
                        let path = write.path.display();
                        info!(tenant, pod = %uid, path = %path, value = %write.value, "cgroup limit set");
                    }
                    out.writes.extend(writes);
                }
                Err(error) => {
                    out.failures.push(PodFailure {
                        pod_uid: uid.clone(),
                        tenant: tenant.to_string(),
                        cgroup: path.clone(),
                        error,
                    });
                }
            }
        }
        for failure in &out.failures {
            warn!(tenant = %failure.tenant, pod = %failure.pod_uid, error = %failure.error, "cannot govern pod");
        }
        debug!(governed = samples.len(), writes = out.writes.len(), absent = out.absent.len(), "cgroup reconcile done");
        out.usage = plan.usage;
        self.cpu = cpu_now;
        self.last = Some(now);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Duration;

    use super::*;
    use crate::cgroup::V2;
    use crate::cgroup::v2::tests::{fixture_root, pod, run};

    const MIB: u64 = 1 << 20;
    const A1: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaa_0001.slice";
    const A2: &str = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podaaaa_0002.slice";
    const B1: &str = "kubepods.slice/kubepods-podbbbb_0001.slice";
    const SYS: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podcccc_0001.slice";

    fn allocation(tenant: &str, cpu_millis: u64, memory_bytes: u64, pids: u64) -> TenantAllocation {
        TenantAllocation {
            tenant: tenant.into(),
            cpu_millis,
            memory_bytes,
            pods: 2,
            pids: Some(pids),
            control_plane: false,
        }
    }

    fn pods() -> Vec<PodTenant> {
        // The system pod (cccc-0001) is in no tenant's namespace, so the pod list names no tenant for it.
        [("aaaa-0001", "a"), ("aaaa_0002", "a"), ("bbbb-0001", "b"), ("dddd-0001", "a")]
            .map(|(uid, tenant)| PodTenant { pod_uid: uid.into(), tenant: tenant.into() })
            .to_vec()
    }

    fn read(root: &Path, cgroup: &str, file: &str) -> String {
        fs::read_to_string(root.join(cgroup).join(file)).unwrap().trim().to_string()
    }

    /// The v2 paths and files end to end: two tenants and a system pod on a fixture root.
    #[test]
    fn governs_a_v2_fixture_node() {
        let root = fixture_root();
        pod(root.path(), A1, 0, 30 * MIB, 4);
        pod(root.path(), A2, 0, 10 * MIB, 2);
        pod(root.path(), B1, 0, 5 * MIB, 1);
        pod(root.path(), SYS, 0, 500 * MIB, 40);
        let mut governor = Governor::new(Box::new(V2::new(root.path())), GovernorSettings::default());
        let allocations = [allocation("a", 500, 64 * MIB, 100), allocation("b", 1000, 128 * MIB, 50)];
        let t0 = Instant::now();

        let first = governor.reconcile(&allocations, &pods(), t0).unwrap();
        assert_eq!(first.layout, Some(Layout::systemd()));
        assert_eq!(first.absent, ["dddd-0001"]);
        assert!(first.failures.is_empty(), "{:?}", first.failures);
        // a's two pods use 30 and 10 of its 64 MiB and 4 and 2 of its 100 pids: each may grow by half
        // of what is left, so together they stay within the share.
        for (cgroup, memory, pids) in [(A1, 42 * MIB, "51"), (A2, 22 * MIB, "49")] {
            assert_eq!(read(root.path(), cgroup, "cpu.max"), "50000 100000");
            assert_eq!(read(root.path(), cgroup, "memory.max"), memory.to_string());
            assert_eq!(read(root.path(), cgroup, "memory.high"), "max");
            assert_eq!(read(root.path(), cgroup, "pids.max"), pids);
        }
        assert_eq!(read(root.path(), B1, "cpu.max"), "100000 100000");
        assert_eq!(read(root.path(), B1, "pids.max"), "50");
        for file in ["cpu.max", "memory.max", "memory.high", "pids.max"] {
            let want = if file == "cpu.max" { "max 100000" } else { "max" };
            assert_eq!(read(root.path(), SYS, file), want, "the system pod is not touched");
        }
        assert_eq!(first.writes.len(), 9);
        assert!(first.writes.iter().all(|w| !w.path.starts_with(root.path().join(SYS))));
        let usage_a = &first.usage[0];
        assert_eq!((usage_a.tenant.as_str(), usage_a.pods, usage_a.memory_bytes, usage_a.pids), ("a", 2, 40 * MIB, 6));

        // Nothing changed: nothing is written.
        let second = governor.reconcile(&allocations, &pods(), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(second.writes, []);

        // a's pods ran 0.45 + 0.15 CPU over the next second, above its 0.5: the quota is split 3:1.
        run(root.path(), A1, 450_000);
        run(root.path(), A2, 150_000);
        let third = governor.reconcile(&allocations, &pods(), t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(read(root.path(), A1, "cpu.max"), "37000 100000");
        assert_eq!(read(root.path(), A2, "cpu.max"), "13000 100000");
        assert_eq!(third.usage[0].cpu_millis, 600);
        assert!(third.usage[0].cpu_split);
        assert_eq!(read(root.path(), B1, "cpu.max"), "100000 100000", "b is idle: not split");

        // a grows to 70 + 10 MiB against 64: memory.high at 54 MiB on both, squeezing the big one.
        fs::write(root.path().join(A1).join("memory.current"), (70 * MIB).to_string()).unwrap();
        governor.reconcile(&allocations, &pods(), t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(read(root.path(), A1, "memory.high"), (54 * MIB).to_string());
        assert_eq!(read(root.path(), A2, "memory.high"), (54 * MIB).to_string());
        assert_eq!(read(root.path(), A1, "cgroup.procs"), "", "no process moved");
    }

    #[test]
    fn a_node_without_kubelet_has_nothing_to_govern() {
        let root = fixture_root();
        let mut governor = Governor::open(root.path(), GovernorSettings::default()).unwrap();
        let out = governor.reconcile(&[allocation("a", 500, 64 * MIB, 100)], &pods(), Instant::now()).unwrap();
        assert_eq!(out.layout, None);
        assert_eq!(out.usage.len(), 1);
        assert_eq!(out.usage[0].pods, 0);
        // b's pod too: a tenant without an allocation here is governed as well.
        assert_eq!(out.absent.len(), 4);
    }

    #[test]
    fn a_pod_that_cannot_be_read_does_not_stop_the_others() {
        let root = fixture_root();
        pod(root.path(), A1, 0, MIB, 1);
        pod(root.path(), B1, 0, MIB, 1);
        fs::write(root.path().join(A1).join("memory.current"), "lots").unwrap();
        let mut governor = Governor::open(root.path(), GovernorSettings::default()).unwrap();
        let allocations = [allocation("a", 500, 64 * MIB, 100), allocation("b", 1000, 128 * MIB, 50)];
        let out = governor.reconcile(&allocations, &pods(), Instant::now()).unwrap();
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].pod_uid, "aaaa-0001");
        assert!(out.failures[0].error.to_string().contains("memory.current"));
        assert_eq!(read(root.path(), B1, "memory.max"), (128 * MIB).to_string());
        assert_eq!(read(root.path(), A1, "memory.max"), "max");
    }
}
