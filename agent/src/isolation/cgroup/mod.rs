//! The cgroup governor: keeps each tenant's pods on this node within the tenant's allocation here.
//!
//! # What it enforces
//! For every tenant with an allocation `A` on this node (cpu millis, memory bytes, pids):
//! - **the pods together within the share**: each of the tenant's pod cgroups gets `memory.max` =
//!   its use plus an equal part of what the tenant has left of `A.memory` (its use scaled down when
//!   the tenant is over), so the limits add up to the share and the pods together cannot pass it
//!   before the next reconcile; `pids.max` the same with `A.pids`, counted tenant-wide; and
//!   `cpu.max = A.cpu` (a quota of `A.cpu_millis` per 1000 of the period);
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
//! Pods of a tenant without an allocation here (not yet known, or not placed here) are held together
//! to [`PolicySettings::unknown_tenant`] (`[isolation.unknown_tenant]` in the agent's config) until
//! the coordinator sends one. Pods of no tenant (the node's system pods) are not touched. The governor never moves processes: it writes no `cgroup.procs`/`tasks` file (refused in
//! `files.rs`); kubelet and the container runtime own placement. Every write goes to a file whose
//! value differs from the wanted one (read, compare, write), so a reconcile with no change writes
//! nothing. Each reconcile returns the per-tenant usage ([`TenantUsage`]) for the report.
//!
//! # The allocation is the coordinator's
//! `A` is `hexa_shared::spec::TenantAllocation` from `NodeSpec::tenants`, as the coordinator
//! decided it (its pids cap from `[isolation] pids_per_pod` there); the governor derives nothing
//! from it. An allocation without a pids cap (a spec saved before allocations carried one) leaves the pods'
//! `pids.max` as it is and enforces the rest.
//!
//! # Layout
//! - [`policy`]: the pure decision, from allocations and samples to wanted [`PodLimits`];
//! - [`Governor`]: one reconcile = discover, sample, decide, write what changed.
//!
//! Where kubelet puts pod cgroups ([`Layout`]), and the [`Cgroups`] interface over v2 and v1 below
//! an injected root (`/sys/fs/cgroup` in production), are the agent's one cgroup layer,
//! [`crate::cgroup`], which the collector reads through too; they are re-exported here.

mod governor;
pub mod policy;

pub use crate::cgroup::discover::{self, Driver, Layout, PodCgroup, Qos};
pub use crate::cgroup::{
    CgroupError, CgroupVersion, Cgroups, CpuMax, DEFAULT_CPU_PERIOD_US, FileWrite, Limit, MIN_CPU_QUOTA_US, PodLimits,
    PodUsage, V1, V2, open, v1, v2,
};
pub use governor::{Governor, GovernorSettings, PodFailure, PodTenant, Reconcile};
pub use policy::{PolicySettings, TenantUsage, UnknownTenantCap};
