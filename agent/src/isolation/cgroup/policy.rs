//! The governor's decision, pure: from the tenants' allocations (as the coordinator decided them,
//! taken as they are) and what their pods used, the limits each pod cgroup should have. No I/O, no
//! clock: the caller passes the interval the samples cover.

use std::collections::BTreeMap;

use hexa_shared::spec::TenantAllocation;

use super::{CpuMax, DEFAULT_CPU_PERIOD_US, Limit, MIN_CPU_QUOTA_US, PodLimits, PodUsage};

/// Knobs of the policy; [`Default`] is what production uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// The CFS period written with every quota.
    pub cpu_period_us: u64,
    /// While a tenant's cpu is split, no pod gets less than this (never below the kernel's 1 ms per
    /// period), so that a pod that was idle in the last interval can still make progress.
    pub min_pod_cpu_millis: u64,
    /// The tenant's cpu is split among its pods when they together used at least this percentage of
    /// its share in the last interval. Once split, the pods cannot use more than the share, so "at or
    /// near the share" is how the governor sees that they still press against it.
    pub cpu_split_percent: u64,
    /// `memory.high` pressure is put on the tenant's pods when they together hold at least this
    /// percentage of its memory share.
    pub memory_pressure_percent: u64,
    /// `memory.high` is never set below this: a lower value would throttle a pod to a crawl.
    pub min_pod_memory_high_bytes: u64,
    /// What the pods of a tenant with no allocation on this node (not known here yet, or not
    /// placed here) are held to together, until the coordinator says otherwise.
    pub unknown_tenant: UnknownTenantCap,
}

/// The allocation a tenant without one is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnknownTenantCap {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Default for UnknownTenantCap {
    fn default() -> Self {
        UnknownTenantCap { cpu_millis: 250, memory_bytes: 256 << 20, pids: 256 }
    }
}

impl UnknownTenantCap {
    /// The allocation of `tenant`, which has none on this node.
    pub fn allocation(&self, tenant: &str) -> TenantAllocation {
        TenantAllocation {
            tenant: tenant.to_string(),
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            pods: 0,
            pids: Some(self.pids),
            control_plane: false,
        }
    }
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            cpu_period_us: DEFAULT_CPU_PERIOD_US,
            min_pod_cpu_millis: 10,
            cpu_split_percent: 90,
            memory_pressure_percent: 90,
            min_pod_memory_high_bytes: 16 << 20,
            unknown_tenant: UnknownTenantCap::default(),
        }
    }
}

/// One tenant's use of this node: the report's own type, so the governor's reading goes out as is.
pub use hexa_shared::report::TenantUsage;

/// One pod of a governed tenant, as sampled in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSample {
    pub uid: String,
    pub tenant: String,
    pub usage: PodUsage,
    /// CPU time used since the previous reconcile; `None` for a pod first seen now.
    pub cpu_delta_usec: Option<u64>,
}

/// The decision: limits per pod UID, usage per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub limits: BTreeMap<String, PodLimits>,
    /// One entry per allocation, sorted by tenant, including tenants with no pod here.
    pub usage: Vec<TenantUsage>,
}

/// Decides the limits of every pod of a tenant: with its allocation when it has one of
/// `allocations`, else with [`PolicySettings::unknown_tenant`]. `interval_usec` is the wall time the
/// cpu deltas cover (`None` on the first reconcile). A tenant listed twice keeps its first
/// allocation. (Pods of no tenant, the node's own, are never among `pods`.)
pub fn plan(
    allocations: &[TenantAllocation],
    pods: &[PodSample],
    interval_usec: Option<u64>,
    settings: &PolicySettings,
) -> Plan {
    let unknown: Vec<TenantAllocation> = pods
        .iter()
        .map(|p| p.tenant.as_str())
        .filter(|t| !allocations.iter().any(|a| a.tenant == *t))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|t| settings.unknown_tenant.allocation(t))
        .collect();
    let mut by_tenant: BTreeMap<&str, (&TenantAllocation, Vec<&PodSample>)> = BTreeMap::new();
    for share in allocations.iter().chain(&unknown) {
        by_tenant.entry(share.tenant.as_str()).or_insert((share, Vec::new()));
    }
    for pod in pods {
        if let Some((_, list)) = by_tenant.get_mut(pod.tenant.as_str()) {
            list.push(pod);
        }
    }
    let mut out = Plan::default();
    for (share, mut pods) in by_tenant.into_values() {
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        let (limits, usage) = plan_tenant(share, &pods, interval_usec.filter(|&i| i > 0), settings);
        out.limits.extend(pods.iter().map(|p| p.uid.clone()).zip(limits));
        out.usage.push(usage);
    }
    out
}

fn plan_tenant(
    share: &TenantAllocation,
    pods: &[&PodSample],
    interval_usec: Option<u64>,
    settings: &PolicySettings,
) -> (Vec<PodLimits>, TenantUsage) {
    let period = settings.cpu_period_us.max(MIN_CPU_QUOTA_US);
    let quota = cpu_quota_us(share.cpu_millis, period);
    // The tenant's pods are held to its share together: each pod may grow by its part of what the
    // tenant has left, so the pods' limits add up to the share (see `split_headroom`).
    let memory: Vec<u64> = pods.iter().map(|p| p.usage.memory_bytes).collect();
    let memory_max = split_headroom(share.memory_bytes, &memory);
    // Without a pids cap (a spec saved before allocations carried it) pids.max is left as it is.
    let pids_max: Vec<Option<u64>> = match share.pids {
        Some(cap) => split_headroom(cap, &pods.iter().map(|p| p.usage.pids).collect::<Vec<_>>())
            .into_iter()
            .map(|p| Some(p.max(1)))
            .collect(),
        None => vec![None; pods.len()],
    };
    let mut limits: Vec<PodLimits> = memory_max
        .iter()
        .zip(&pids_max)
        .map(|(memory, pids)| PodLimits {
            cpu: CpuMax { quota_us: Limit::Value(quota), period_us: period },
            memory_max: Limit::Value(*memory),
            memory_high: Limit::Max,
            pids_max: pids.map(Limit::Value),
        })
        .collect();

    let known: Vec<u64> = pods.iter().filter_map(|p| p.cpu_delta_usec).collect();
    let used_cpu_millis = match interval_usec {
        Some(interval) if !known.is_empty() => {
            let total: u128 = known.iter().map(|&d| u128::from(d)).sum();
            u64::try_from(total * 1000 / u128::from(interval)).unwrap_or(u64::MAX)
        }
        _ => 0,
    };
    let cpu_split = interval_usec.is_some()
        && !known.is_empty()
        && u128::from(used_cpu_millis) * 100 >= u128::from(share.cpu_millis) * u128::from(settings.cpu_split_percent);
    if cpu_split {
        // A pod first seen now has no delta yet: count it at the tenant's mean demand.
        let mean = known.iter().sum::<u64>() / known.len() as u64;
        let demands: Vec<u64> = pods.iter().map(|p| p.cpu_delta_usec.unwrap_or(mean)).collect();
        let floor = cpu_quota_us(settings.min_pod_cpu_millis, period);
        for (pod, q) in limits.iter_mut().zip(split_cpu_quota(quota, &demands, floor)) {
            // Only when the share is below 1 ms per pod per period does this lift the sum above it.
            pod.cpu.quota_us = Limit::Value(q.max(MIN_CPU_QUOTA_US));
        }
    }

    let memory_total = memory.iter().fold(0u64, |a, &m| a.saturating_add(m));
    let memory_pressure = !pods.is_empty()
        && share.memory_bytes > 0
        && u128::from(memory_total) * 100
            >= u128::from(share.memory_bytes) * u128::from(settings.memory_pressure_percent);
    if memory_pressure {
        let level =
            memory_level(share.memory_bytes, &memory).max(settings.min_pod_memory_high_bytes).min(share.memory_bytes);
        for pod in &mut limits {
            pod.memory_high = Limit::Value(level);
        }
    }

    let usage = TenantUsage {
        tenant: share.tenant.clone(),
        pods: u32::try_from(pods.len()).unwrap_or(u32::MAX),
        cpu_millis: used_cpu_millis,
        memory_bytes: memory_total,
        pids: pods.iter().fold(0u64, |a, p| a.saturating_add(p.usage.pids)),
        cpu_split,
        memory_pressure,
    };
    (limits, usage)
}

/// Per-pod limits that add up to exactly `cap` for pods using `used`: under the cap, each pod its
/// use plus an equal part of what is left (the earlier pods take the remainder), so no pod is
/// squeezed and all of them together cannot pass the cap before the next reconcile; over it (the
/// share shrank, or the pods grew before they were governed), each pod its use scaled down to the
/// cap, so the kernel reclaims or kills in proportion.
pub fn split_headroom(cap: u64, used: &[u64]) -> Vec<u64> {
    let n = used.len() as u128;
    if n == 0 {
        return Vec::new();
    }
    let total: u128 = used.iter().map(|&u| u128::from(u)).sum();
    let cap = u128::from(cap);
    let mut parts: Vec<u128> = if total <= cap {
        let each = (cap - total) / n;
        used.iter().map(|&u| u128::from(u) + each).collect()
    } else {
        used.iter().map(|&u| u128::from(u) * cap / total).collect()
    };
    let left = cap - parts.iter().sum::<u128>();
    for part in parts.iter_mut().take(usize::try_from(left).unwrap_or(usize::MAX)) {
        *part += 1;
    }
    parts.into_iter().map(|p| u64::try_from(p).unwrap_or(u64::MAX)).collect()
}

/// `millis` of a CPU as a quota per `period_us`, at least the kernel's minimum.
pub fn cpu_quota_us(millis: u64, period_us: u64) -> u64 {
    let quota = u128::from(millis) * u128::from(period_us) / 1000;
    u64::try_from(quota).unwrap_or(u64::MAX).max(MIN_CPU_QUOTA_US)
}

/// Splits `total` among pods in proportion to `demands`, every pod getting at least `floor` (lowered
/// to `total / n` when `floor × n` does not fit). The parts sum to exactly `total`: each pod gets the
/// floor plus the integer part of its proportional share of the rest, and the units left over go to
/// the pods with the largest fractional parts (the earlier pod on a tie). All demands zero: equal parts.
pub fn split_cpu_quota(total: u64, demands: &[u64], floor: u64) -> Vec<u64> {
    let n = demands.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let floor = floor.min(total / n);
    let rest = u128::from(total - floor * n);
    let idle = demands.iter().all(|&d| d == 0);
    let weight = |d: u64| if idle { 1 } else { u128::from(d) };
    let sum: u128 = demands.iter().map(|&d| weight(d)).sum();
    let mut parts: Vec<(u64, u128)> = demands
        .iter()
        .map(|&d| {
            let exact = rest * weight(d);
            // Each integer part is at most `rest`, which came from a u64.
            (u64::try_from(exact / sum).unwrap_or(u64::MAX), exact % sum)
        })
        .collect();
    let given: u64 = parts.iter().map(|&(p, _)| p).sum();
    let left = u64::try_from(rest).unwrap_or(u64::MAX) - given;
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[b].1.cmp(&parts[a].1).then(a.cmp(&b)));
    for &i in order.iter().take(usize::try_from(left).unwrap_or(usize::MAX)) {
        parts[i].0 += 1;
    }
    parts.into_iter().map(|(p, _)| floor + p).collect()
}

/// The `memory.high` level `L` for a tenant whose pods use `usages` against `share`.
///
/// Over the share: the water level at which the usages capped at `L` add up to the share, so the
/// pods above `L` (the largest) are reclaimed down to it and the others are not squeezed. At or under
/// the share: the largest pod's usage plus the headroom left, so that any one pod may still grow by
/// what the tenant has left. The result is never above the share.
pub fn memory_level(share: u64, usages: &[u64]) -> u64 {
    let total: u128 = usages.iter().map(|&u| u128::from(u)).sum();
    let largest = usages.iter().copied().max().unwrap_or(0);
    if total <= u128::from(share) {
        let headroom = u64::try_from(u128::from(share) - total).unwrap_or(u64::MAX);
        return largest.saturating_add(headroom).min(share);
    }
    let mut sorted = usages.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    // Cap the k largest at L and keep the rest: L = (share - sum(rest)) / k, valid once L >= the next.
    let mut rest: u128 = total;
    for k in 1..=sorted.len() {
        rest -= u128::from(sorted[k - 1]);
        if rest > u128::from(share) {
            continue;
        }
        let level = (u128::from(share) - rest) / k as u128;
        let next = sorted.get(k).copied().unwrap_or(0);
        if level >= u128::from(next) {
            return u64::try_from(level).unwrap_or(share);
        }
    }
    // Unreachable with k = n (rest = 0 <= share and level >= 0), kept total for the compiler.
    share / sorted.len().max(1) as u64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn headroom_split_table() {
        for (cap, used, want) in [
            (64, vec![10, 20], vec![27, 37]),
            (64, vec![0, 0, 0], vec![22, 21, 21]),
            (64, vec![64], vec![64]),
            (60, vec![60, 30], vec![40, 20]),
            (10, vec![7, 7, 7], vec![4, 3, 3]),
            (5, vec![], vec![]),
        ] {
            let got = split_headroom(cap, &used);
            assert_eq!(got, want, "{cap} {used:?}");
            if !used.is_empty() {
                assert_eq!(got.iter().sum::<u64>(), cap);
            }
        }
    }

    proptest! {
        #[test]
        fn the_limits_of_a_tenant_s_pods_never_add_up_to_more_than_its_share(
            cap in 0u64..1 << 40,
            used in proptest::collection::vec(0u64..1 << 40, 1..40),
        ) {
            let parts = split_headroom(cap, &used);
            prop_assert_eq!(parts.iter().map(|&p| u128::from(p)).sum::<u128>(), u128::from(cap));
            let total: u128 = used.iter().map(|&u| u128::from(u)).sum();
            if total <= u128::from(cap) {
                for (part, used) in parts.iter().zip(&used) {
                    prop_assert!(part >= used, "a pod under the share is squeezed");
                }
            }
        }
    }

    #[test]
    fn split_table() {
        for (total, demands, floor, want) in [
            (50_000, vec![1, 1, 2], 1_000, vec![12_750, 12_750, 24_500]),
            (10, vec![1, 1, 1], 0, vec![4, 3, 3]),
            (100, vec![0, 0, 0, 0], 0, vec![25, 25, 25, 25]),
            (100, vec![0, 7], 10, vec![10, 90]),
            (100, vec![5, 5, 5], 50, vec![34, 33, 33]),
            (50_000, vec![3, 997], 1_000, vec![1_144, 48_856]),
            (7, vec![], 0, vec![]),
        ] {
            let got = split_cpu_quota(total, &demands, floor);
            assert_eq!(got, want, "{total} {demands:?} {floor}");
            if !demands.is_empty() {
                assert_eq!(got.iter().sum::<u64>(), total);
            }
        }
    }

    #[test]
    fn memory_level_table() {
        for (share, usages, want) in [
            (64, vec![100, 10], 54),
            (60, vec![30, 30, 30], 20),
            (100, vec![80, 70, 5], 47),
            (64, vec![10, 20], 54),
            (64, vec![], 64),
            (64, vec![64], 64),
        ] {
            assert_eq!(memory_level(share, &usages), want, "{share} {usages:?}");
        }
    }

    proptest! {
        #[test]
        fn split_sums_to_the_total_and_follows_demand(
            total in 0u64..10_000_000,
            demands in proptest::collection::vec(0u64..1_000_000_000, 1..12),
            floor in 0u64..100_000,
        ) {
            let parts = split_cpu_quota(total, &demands, floor);
            prop_assert_eq!(parts.iter().sum::<u64>(), total);
            let floor = floor.min(total / demands.len() as u64);
            for (i, &p) in parts.iter().enumerate() {
                prop_assert!(p >= floor);
                for (j, &q) in parts.iter().enumerate() {
                    if demands[i] > demands[j] {
                        prop_assert!(p + 1 >= q, "more demand, less quota: {:?} -> {:?}", demands, parts);
                    }
                }
            }
        }

        #[test]
        fn memory_level_brings_the_total_back_to_the_share(
            share in 1u64..1 << 40,
            usages in proptest::collection::vec(0u64..1 << 40, 1..12),
        ) {
            let level = memory_level(share, &usages);
            prop_assert!(level <= share);
            let capped: u128 = usages.iter().map(|&u| u128::from(u.min(level))).sum();
            let total: u128 = usages.iter().map(|&u| u128::from(u)).sum();
            if total > u128::from(share) {
                prop_assert!(capped <= u128::from(share));
                prop_assert!(capped + usages.len() as u128 > u128::from(share), "level {} too low", level);
            } else {
                prop_assert!(level >= *usages.iter().max().unwrap());
            }
        }
    }

    fn share(tenant: &str, cpu_millis: u64, memory_bytes: u64) -> TenantAllocation {
        TenantAllocation {
            tenant: tenant.into(),
            cpu_millis,
            memory_bytes,
            pods: 1,
            pids: Some(100),
            control_plane: false,
        }
    }

    fn pod(uid: &str, tenant: &str, cpu_delta_usec: Option<u64>, memory_bytes: u64) -> PodSample {
        PodSample {
            uid: uid.into(),
            tenant: tenant.into(),
            usage: PodUsage { memory_bytes, pids: 2, ..Default::default() },
            cpu_delta_usec,
        }
    }

    #[test]
    fn a_tenant_s_pods_are_held_to_its_share_together_and_an_unknown_tenant_s_to_the_default() {
        let settings = PolicySettings::default();
        let plan = plan(
            &[share("a", 500, 64 * MIB)],
            &[pod("p1", "a", None, MIB), pod("p2", "a", None, MIB), pod("x1", "stranger", None, 900 * MIB)],
            None,
            &settings,
        );
        // 62 MiB left, 31 MiB more for each: the two limits add up to the share, not twice it.
        let cap = PodLimits {
            cpu: CpuMax { quota_us: Limit::Value(50_000), period_us: 100_000 },
            memory_max: Limit::Value(32 * MIB),
            memory_high: Limit::Max,
            pids_max: Some(Limit::Value(50)),
        };
        assert_eq!(plan.limits.len(), 3, "{plan:?}");
        assert_eq!(plan.limits["p1"], cap);
        assert_eq!(plan.limits["p2"], cap);
        // A tenant with no allocation here is held to the default, even over it.
        let stranger = &plan.limits["x1"];
        assert_eq!(stranger.memory_max, Limit::Value(settings.unknown_tenant.memory_bytes));
        assert_eq!(stranger.pids_max, Some(Limit::Value(settings.unknown_tenant.pids)));
        assert_eq!(stranger.cpu.quota_us, Limit::Value(25_000));
        assert_eq!(
            plan.usage[..1],
            [TenantUsage {
                tenant: "a".into(),
                pods: 2,
                cpu_millis: 0,
                memory_bytes: 2 * MIB,
                pids: 4,
                cpu_split: false,
                memory_pressure: false
            }]
        );
    }

    #[test]
    fn the_cpu_split_engages_at_the_share_and_follows_demand() {
        let settings = PolicySettings::default();
        let shares = [share("a", 500, 1 << 30), share("b", 2000, 1 << 30)];
        // Over one second, a's pods used 0.6 + 0.2 CPU (over its 0.5), b's 0.3 of its 2.
        let pods = [
            pod("a1", "a", Some(600_000), MIB),
            pod("a2", "a", Some(200_000), MIB),
            pod("a3", "a", None, MIB),
            pod("b1", "b", Some(300_000), MIB),
        ];
        let plan = plan(&shares, &pods, Some(1_000_000), &settings);
        let quota = |uid: &str| match plan.limits[uid].cpu.quota_us {
            Limit::Value(q) => q,
            Limit::Max => panic!("no quota"),
        };
        // a3 is new and counts at the mean demand (400 ms): weights 6:2:4 over 50 ms less 3 floors.
        assert_eq!([quota("a1"), quota("a2"), quota("a3")], [24_500, 8_833, 16_667]);
        assert_eq!(quota("a1") + quota("a2") + quota("a3"), 50_000);
        assert_eq!(quota("b1"), 200_000, "b is under its share: capped, not split");
        assert!(plan.usage[0].cpu_split && !plan.usage[1].cpu_split);
        assert_eq!(plan.usage[0].cpu_millis, 800);
        assert_eq!(plan.usage[1].cpu_millis, 300);
    }

    #[test]
    fn memory_pressure_lands_on_the_largest_pods() {
        let plan = plan(
            &[share("a", 1000, 64 * MIB)],
            &[pod("big", "a", None, 60 * MIB), pod("small", "a", None, 20 * MIB)],
            None,
            &PolicySettings::default(),
        );
        // 80 MiB against 64: the level is 44 MiB, so only `big` is reclaimed (by 16 MiB).
        assert_eq!(plan.limits["big"].memory_high, Limit::Value(44 * MIB));
        assert_eq!(plan.limits["small"].memory_high, Limit::Value(44 * MIB));
        assert!(plan.usage[0].memory_pressure);

        let relaxed = super::plan(
            &[share("a", 1000, 64 * MIB)],
            &[pod("big", "a", None, 30 * MIB), pod("small", "a", None, 20 * MIB)],
            None,
            &PolicySettings::default(),
        );
        assert_eq!(relaxed.limits["big"].memory_high, Limit::Max, "78% of the share: no pressure");
    }

    #[test]
    fn pids_are_the_allocations_own_and_absent_ones_leave_the_pods_alone() {
        let decided = TenantAllocation { pods: 30, pids: Some(777), ..share("a", 500, 64 * MIB) };
        let plan = plan(std::slice::from_ref(&decided), &[pod("p1", "a", None, MIB)], None, &PolicySettings::default());
        assert_eq!(plan.limits["p1"].pids_max, Some(Limit::Value(777)), "not derived from the 30 pods");
        let unset = TenantAllocation { pids: None, ..decided };
        let plan = super::plan(&[unset], &[pod("p1", "a", None, MIB)], None, &PolicySettings::default());
        assert_eq!(plan.limits["p1"].pids_max, None);
        assert_eq!(plan.limits["p1"].memory_max, Limit::Value(64 * MIB), "the rest is still enforced");
    }
}
