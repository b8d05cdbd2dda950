//! Benchmark helpers: a seeded synthetic fleet, a lower bound on the nodes a fleet's tenants need,
//! and [`run_case`], which places every tenant with one algorithm and reports the figures the
//! `hexa-bench placement` binary prints. Timing lives here only; placement itself knows no clock.

use std::str::FromStr;
use std::time::Instant;

use serde::Serialize;

use hexa_shared::report::Resources;
use hexa_shared::tenant::{Plan, SharedPlan};

use super::room::{Room, live_memory, usable_capacity};
use super::{NodePool, NodeState, PlacementConfig, PlacementError, PlacementState, Request, Strategy};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// SplitMix64: a small, fast, seeded generator, so a fleet is the same for a seed on every platform
/// and every version of every dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Nodes and tenants (in arrival order) of a synthetic fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticFleet {
    pub nodes: Vec<NodeState>,
    pub tenants: Vec<(String, SharedPlan)>,
}

/// A fleet of `nodes` shared nodes of four shapes and `tenants` shared tenants with a skewed size
/// mix, the same for the same seed.
///
/// Nodes (vCPU / GiB / max pods): 25% 8/32/250, 40% 16/64/500, 20% 32/128/1000 and 15%
/// memory-optimised 8/64/250, in random name order; allocatable is capacity less 250m CPU and 6%
/// memory, `MemAvailable` 97% of memory.
/// Tenants: 70% small (250m to 1 CPU, spread 1 or 2, one replica), 25% medium (1 to 4 CPU, spread 1
/// to 3, 40% with three replicas), 5% large (4 to 16 CPU, three replicas, spread 3 to 6); memory is
/// 1, 2, 2 or 4 GiB per CPU; pods 4 to 128 by size. At ten tenants per node this fills about half of
/// the fleet's CPU and memory.
pub fn synthetic_fleet(nodes: usize, tenants: usize, seed: u64) -> SyntheticFleet {
    let mut rng = SplitMix64::new(seed);
    let nodes = (0..nodes)
        .map(|i| {
            let roll = rng.below(100);
            let (cpus, mem_gib, pods) = match roll {
                0..25 => (8, 32, 250),
                25..65 => (16, 64, 500),
                65..85 => (32, 128, 1000),
                _ => (8, 64, 250),
            };
            let memory = mem_gib * GIB;
            NodeState {
                name: format!("node-{i:05}"),
                pool: NodePool::Shared,
                ready: true,
                schedulable: true,
                allocatable: Resources {
                    cpu_millis: cpus * 1000 - 250,
                    memory_bytes: memory / 100 * 94,
                    ephemeral_bytes: 200 * GIB,
                    pods,
                },
                memory_available_bytes: memory / 100 * 97,
            }
        })
        .collect();
    let tenants = (0..tenants)
        .map(|i| {
            let roll = rng.below(100);
            let gib_per_cpu = rng.pick(&[1, 2, 2, 4]);
            let (cpu_millis, replicas, spread, pods) = match roll {
                0..70 => {
                    let cpu = rng.pick(&[250, 500, 500, 1000]);
                    let spread = if cpu >= 500 && rng.percent(20) { 2 } else { 1 };
                    (cpu, 1, spread, 4 + rng.below(13) as u32)
                }
                70..95 => {
                    let cpu = rng.pick(&[1000, 2000, 4000]);
                    let replicas = if rng.percent(40) { 3 } else { 1 };
                    let spread = rng.pick(&[1, 2, 3]).max(replicas);
                    (cpu, replicas, spread, 16 + rng.below(33) as u32)
                }
                _ => {
                    let cpu = rng.pick(&[4000, 8000, 16000]);
                    (cpu, 3, rng.pick(&[3, 4, 6]), 48 + rng.below(81) as u32)
                }
            };
            let memory_bytes = cpu_millis * gib_per_cpu * GIB / 1000;
            let plan = SharedPlan {
                cpu_millis,
                memory_bytes: memory_bytes.max(128 * MIB),
                pods,
                replicas,
                spread: spread as u32,
            };
            (format!("t{i:06}"), plan)
        })
        .collect();
    SyntheticFleet { nodes, tenants }
}

/// A lower bound on the number of nodes any placement of `plans` on `nodes` needs: for each of
/// CPU, memory and pods, the fewest nodes whose combined room (the largest nodes first) covers the
/// total demand, and at least the largest spread. Returns the number of eligible nodes plus one when
/// even all of them cannot cover the demand.
pub fn lower_bound<'a>(
    config: &PlacementConfig,
    nodes: &[NodeState],
    plans: impl IntoIterator<Item = &'a SharedPlan>,
) -> usize {
    let mut demand = [0u128; 3];
    let mut widest = 0usize;
    for plan in plans {
        let share = Room::of(&plan.share_size());
        let spread = u128::from(plan.spread);
        demand[0] += u128::from(share.cpu_millis) * spread;
        demand[1] += u128::from(share.memory_bytes) * spread;
        demand[2] += u128::from(share.pods) * spread;
        widest = widest.max(plan.spread as usize);
    }
    let rooms: Vec<Room> = nodes
        .iter()
        .filter(|n| n.pool == NodePool::Shared && n.ready && n.schedulable)
        .map(|n| {
            let cap = usable_capacity(&n.allocatable, config);
            let live = live_memory(&n.allocatable, n.memory_available_bytes, config);
            Room { memory_bytes: cap.memory_bytes.min(live), ..cap }
        })
        .collect();
    let mut bound = widest;
    for (dim, wanted) in demand.iter().enumerate() {
        let mut sizes: Vec<u64> = rooms
            .iter()
            .map(|r| match dim {
                0 => r.cpu_millis,
                1 => r.memory_bytes,
                _ => r.pods,
            })
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut covered = 0u128;
        let mut count = 0;
        while covered < *wanted {
            match sizes.get(count) {
                Some(size) => {
                    covered += u128::from(*size);
                    count += 1;
                }
                None => {
                    count = sizes.len() + 1;
                    break;
                }
            }
        }
        bound = bound.max(count);
    }
    bound
}

/// The placement algorithms the benchmark compares.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Ours: dominant-resource best fit, largest empty node when nothing used fits; online.
    DominantBestFit,
    /// Tenants sorted by share size, largest first, each share on the first node by name with room.
    FirstFitDecreasing,
    /// Kubernetes' NodeResourcesFit LeastAllocated; online.
    LeastAllocated,
    /// Kubernetes' NodeResourcesFit MostAllocated; online.
    MostAllocated,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::DominantBestFit,
        Algorithm::FirstFitDecreasing,
        Algorithm::LeastAllocated,
        Algorithm::MostAllocated,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::DominantBestFit => "dominant-best-fit",
            Algorithm::FirstFitDecreasing => "first-fit-decreasing",
            Algorithm::LeastAllocated => "least-allocated",
            Algorithm::MostAllocated => "most-allocated",
        }
    }

    pub fn strategy(&self) -> Strategy {
        match self {
            Algorithm::DominantBestFit => Strategy::DominantBestFit,
            Algorithm::FirstFitDecreasing => Strategy::FirstFit,
            Algorithm::LeastAllocated => Strategy::LeastAllocated,
            Algorithm::MostAllocated => Strategy::MostAllocated,
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
            format!("unknown algorithm {s:?}: use one of {}", names.join(", "))
        })
    }
}

/// What one benchmark case measured; printed as one JSON line.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CaseFigures {
    pub algorithm: Algorithm,
    /// Fleet size.
    pub nodes: usize,
    pub tenants: usize,
    /// Tenants that found no room (0 in a fleet sized as [`synthetic_fleet`] sizes it).
    pub unplaced: usize,
    /// Tenants placed per second of wall time, decision and commit included.
    pub placements_per_sec: f64,
    /// 99th percentile of one tenant's decision plus commit, in microseconds.
    pub p99_us: f64,
    /// Nodes holding at least one share.
    pub nodes_used: usize,
    /// [`lower_bound`] for the fleet's tenants.
    pub lower_bound: usize,
    /// Free CPU on used nodes that cannot host the fleet's smallest share, as a percentage of the
    /// used nodes' usable CPU.
    pub stranded_cpu_pct: f64,
    /// The same for memory.
    pub stranded_mem_pct: f64,
}

/// Generates the fleet for `seed`, places all its tenants with `algorithm` (one request and one
/// commit each, as the coordinator does) and measures.
pub fn run_case(algorithm: Algorithm, nodes: usize, tenants: usize, seed: u64) -> Result<CaseFigures, PlacementError> {
    let fleet = synthetic_fleet(nodes, tenants, seed);
    let config = PlacementConfig { strategy: algorithm.strategy(), ..PlacementConfig::default() };
    let lower_bound = lower_bound(&config, &fleet.nodes, fleet.tenants.iter().map(|(_, plan)| plan));
    let mut state = PlacementState::new(config, fleet.nodes, Vec::new())?;
    let fleet_room =
        state.nodes().filter_map(|n| state.capacity(&n.name)).fold(Room::default(), |a, b| a.saturating_add(&b));
    let weight = |plan: &SharedPlan| {
        let share = Room::of(&plan.share_size());
        (u128::from(share.cpu_millis) * u128::from(fleet_room.memory_bytes))
            .max(u128::from(share.memory_bytes) * u128::from(fleet_room.cpu_millis))
    };
    let smallest =
        fleet.tenants.iter().map(|(_, plan)| plan).min_by_key(|plan| weight(plan)).map(|p| Room::of(&p.share_size()));

    let started = Instant::now();
    let mut order: Vec<&(String, SharedPlan)> = fleet.tenants.iter().collect();
    if algorithm == Algorithm::FirstFitDecreasing {
        order.sort_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then_with(|| a.0.cmp(&b.0)));
    }
    let mut latencies: Vec<u64> = Vec::with_capacity(order.len());
    let mut unplaced = 0;
    for (name, plan) in order {
        let one = Instant::now();
        let request = Request::Place { tenant: name.clone(), plan: Plan::Shared(*plan) };
        match state.decide(&request) {
            Ok(decision) => state.apply(&decision),
            Err(_) => unplaced += 1,
        }
        latencies.push(u64::try_from(one.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let elapsed = started.elapsed().as_secs_f64();

    latencies.sort_unstable();
    let p99 = latencies.get((latencies.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0);
    let mut used = 0;
    let (mut capacity, mut stranded) = (Room::default(), Room::default());
    for node in state.nodes() {
        let (Some(reserved), Some(cap), Some(free)) =
            (state.reserved(&node.name), state.capacity(&node.name), state.free_room(&node.name))
        else {
            continue;
        };
        if reserved.is_zero() {
            continue;
        }
        used += 1;
        capacity = capacity.saturating_add(&cap);
        if smallest.is_some_and(|s| !free.fits(&s)) {
            stranded = stranded.saturating_add(&free);
        }
    }
    let pct = |part: u64, whole: u64| if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 };
    Ok(CaseFigures {
        algorithm,
        nodes,
        tenants,
        unplaced,
        placements_per_sec: if elapsed > 0.0 { tenants as f64 / elapsed } else { 0.0 },
        p99_us: p99 as f64 / 1000.0,
        nodes_used: used,
        lower_bound,
        stranded_cpu_pct: pct(stranded.cpu_millis, capacity.cpu_millis),
        stranded_mem_pct: pct(stranded.memory_bytes, capacity.memory_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_are_the_same_for_a_seed_and_differ_across_seeds() {
        assert_eq!(synthetic_fleet(50, 200, 7), synthetic_fleet(50, 200, 7));
        assert_ne!(synthetic_fleet(50, 200, 7), synthetic_fleet(50, 200, 8));
    }

    #[test]
    fn the_fleet_has_the_documented_mix_and_only_valid_plans() {
        let fleet = synthetic_fleet(2000, 20_000, 1);
        let large_nodes = fleet.nodes.iter().filter(|n| n.allocatable.cpu_millis > 16_000).count();
        assert!((300..500).contains(&large_nodes), "{large_nodes} of 2000 nodes are 32 vCPU, expected about 20%");
        let small = fleet.tenants.iter().filter(|(_, p)| p.cpu_millis <= 1000 && p.replicas == 1).count();
        assert!(small > 14_000, "{small} of 20000 tenants are small, expected about 70% or more");
        let large = fleet.tenants.iter().filter(|(_, p)| p.cpu_millis >= 4000 && p.replicas == 3).count();
        assert!((500..2500).contains(&large), "{large} large tenants");
        for (name, plan) in &fleet.tenants {
            assert_eq!(plan.validate(), Ok(()), "{name} {plan:?}");
        }
    }

    #[test]
    fn lower_bound_counts_the_largest_nodes_first() {
        let node = |name: &str, cpus: u64, mem_gib: u64| NodeState {
            name: name.into(),
            pool: NodePool::Shared,
            ready: true,
            schedulable: true,
            allocatable: Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: mem_gib * GIB,
                ephemeral_bytes: 0,
                pods: 100,
            },
            memory_available_bytes: mem_gib * GIB,
        };
        let config =
            PlacementConfig { cpu_overcommit: 1.0, memory_overcommit: 1.0, headroom: 0.0, ..Default::default() };
        let nodes = vec![node("a", 4, 16), node("b", 16, 16), node("c", 8, 64)];
        let plan = |cpu: u64, mem_gib: u64, spread: u32| SharedPlan {
            cpu_millis: cpu * 1000,
            memory_bytes: mem_gib * GIB,
            pods: spread,
            replicas: 1,
            spread,
        };
        let table: &[(Vec<SharedPlan>, usize)] = &[
            (vec![], 0),
            (vec![plan(16, 1, 1)], 1),
            (vec![plan(17, 1, 1)], 2),
            (vec![plan(1, 70, 1)], 2),
            (vec![plan(3, 3, 3)], 3),
            (vec![plan(29, 1, 1)], 4),
        ];
        for (plans, expected) in table {
            assert_eq!(lower_bound(&config, &nodes, plans.iter()), *expected, "{plans:?}");
        }
    }

    #[test]
    fn every_algorithm_places_a_small_fleet_within_its_bounds() {
        for algorithm in Algorithm::ALL {
            let figures = run_case(algorithm, 60, 600, 3).unwrap();
            assert_eq!(figures.algorithm, algorithm);
            assert_eq!(figures.unplaced, 0, "{figures:?}");
            assert!(figures.nodes_used >= figures.lower_bound, "{figures:?}");
            assert!(figures.nodes_used <= 60, "{figures:?}");
            assert!((0.0..=100.0).contains(&figures.stranded_cpu_pct), "{figures:?}");
            let line = serde_json::to_string(&figures).unwrap();
            assert!(line.contains(&format!("\"algorithm\":\"{}\"", algorithm.name())), "{line}");
        }
        assert_eq!("most-allocated".parse::<Algorithm>(), Ok(Algorithm::MostAllocated));
        assert!("best".parse::<Algorithm>().unwrap_err().contains("use one of dominant-best-fit"));
    }
}
