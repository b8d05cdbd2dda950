//! The capacity report an agent sends every interval, and at once when its state changes.

use serde::{Deserialize, Serialize};

/// Countable resources of a node, in the units Kubernetes uses.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_bytes: u64,
    pub pods: u32,
}

/// Pressure stall averages (percent of wall time) for one resource, from `/proc/pressure/*`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct PressureAverages {
    pub some_avg10: f32,
    pub some_avg60: f32,
    pub some_avg300: f32,
    /// Absent for CPU on kernels that do not report "full" for it.
    pub full_avg10: Option<f32>,
    pub full_avg60: Option<f32>,
    pub full_avg300: Option<f32>,
}

/// PSI for each resource; `None` where the kernel has no pressure accounting.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    pub cpu: Option<PressureAverages>,
    pub memory: Option<PressureAverages>,
    pub io: Option<PressureAverages>,
}

/// Live usage at collection time.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// CPU busy since the previous sample, in millicores (of `capacity.cpu_millis`).
    pub cpu_used_millis: u64,
    /// `MemAvailable`, or the room left under the agent's cgroup memory limit when that is smaller.
    pub memory_available_bytes: u64,
    /// Free space for unprivileged users on the ephemeral-storage filesystem.
    pub ephemeral_available_bytes: u64,
    pub load1: f32,
    pub load5: f32,
    pub load15: f32,
    pub pressure: Pressure,
}

/// A limit that applies to the agent's own cgroup, which caps what it may report as capacity.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupLimits {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CapacityReport {
    /// Increases by one per report on a connection; echoed in the coordinator's ack.
    pub seq: u64,
    /// The name the agent believes it has. Ignored by the coordinator: identity is the certificate.
    pub node_name: String,
    pub collected_at_unix_ms: u64,
    /// What the node has (after any cgroup limit on the agent itself).
    pub capacity: Resources,
    /// What tenants may be given: capacity less system and kube reservations and eviction margin.
    pub allocatable: Resources,
    pub usage: Usage,
    pub cgroup_limits: CgroupLimits,
    /// Generation of the last spec the agent applied (0 when none).
    pub applied_generation: u64,
    /// K3s on this node.
    pub k3s: crate::k3s::K3sState,
    /// The pods running on this node, as its kubelet's API server knows them.
    pub pods: Vec<PodInfo>,
    /// Each tenant's use of this node, read from its pods' cgroups.
    pub tenant_usage: Vec<TenantUsage>,
    /// Firewall reconciles since the agent started that only had to put our rules back in front
    /// of another program's (something on the node keeps moving them).
    #[serde(default)]
    pub firewall_displacements: u64,
    /// What enforcing isolation has cost this node and how often it had to be put right.
    #[serde(default)]
    pub isolation: IsolationFigures,
}

/// Counters of the agent's isolation since it started (they start again from zero when it
/// restarts): how long applying it takes and how often it had to be put right. Each figure speaks
/// only for the node that reports it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IsolationFigures {
    /// Firewall reconciles that wrote a batch (a new spec, new local pods, or drift put right).
    pub firewall_applies: u64,
    /// Their time together, in microseconds: reading the rules, writing the batch, reading back.
    pub firewall_apply_micros: u64,
    /// The last one's time, in microseconds.
    pub firewall_last_apply_micros: u64,
    /// Reconciles that found the rules changed by something else while what the agent wants was
    /// the same as at the reconcile before, and put them back.
    pub firewall_drift_repairs: u64,
    /// cgroup governor passes (sample every tenant pod, set what changed).
    pub cgroup_passes: u64,
    /// Their time together, in microseconds.
    pub cgroup_pass_micros: u64,
    /// The last one's time, in microseconds.
    pub cgroup_last_pass_micros: u64,
    /// cgroup files the governor wrote (a limit set or changed).
    pub cgroup_writes: u64,
}

/// One tenant's use of one node.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TenantUsage {
    pub tenant: String,
    /// The tenant's pods found on the node.
    pub pods: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    /// The tenant pressed against its cpu share and its quota is split among its pods.
    pub cpu_split: bool,
    /// The tenant is at or near its memory share and reclaim pressure is on.
    pub memory_pressure: bool,
}

/// One pod on a node, as isolation needs it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Option<std::net::Ipv4Addr>,
    /// The tenant the pod belongs to (host namespace `hx-<tenant>`), if any.
    pub tenant: Option<String>,
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    fn resources() -> impl Strategy<Value = Resources> {
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(cpu_millis, memory_bytes, ephemeral_bytes, pods)| Resources {
                cpu_millis,
                memory_bytes,
                ephemeral_bytes,
                pods,
            },
        )
    }

    fn averages() -> impl Strategy<Value = PressureAverages> {
        (0f32..100.0, 0f32..100.0, proptest::option::of(0f32..100.0)).prop_map(|(a, b, full)| PressureAverages {
            some_avg10: a,
            some_avg60: b,
            some_avg300: b,
            full_avg10: full,
            full_avg60: full,
            full_avg300: full,
        })
    }

    pub fn capacity_report() -> impl Strategy<Value = CapacityReport> {
        (
            any::<u64>(),
            "[a-z0-9-]{1,20}",
            resources(),
            resources(),
            (any::<u64>(), any::<u64>(), 0f32..64.0),
            proptest::option::of(averages()),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
        )
            .prop_map(|(seq, node_name, capacity, allocatable, (cpu, mem, load), psi, limit, generation)| {
                CapacityReport {
                    seq,
                    node_name,
                    collected_at_unix_ms: seq / 3,
                    capacity,
                    allocatable,
                    usage: Usage {
                        cpu_used_millis: cpu,
                        memory_available_bytes: mem,
                        ephemeral_available_bytes: mem / 2,
                        load1: load,
                        load5: load,
                        load15: load,
                        pressure: Pressure { cpu: psi, memory: psi, io: None },
                    },
                    cgroup_limits: CgroupLimits { cpu_millis: limit, memory_bytes: limit },
                    applied_generation: generation,
                    pods: vec![PodInfo {
                        namespace: "hx-acme".into(),
                        name: format!("pod-{seq}"),
                        uid: "u".into(),
                        ip: Some(std::net::Ipv4Addr::new(10, 42, 0, (seq % 250) as u8)),
                        tenant: Some("acme".into()),
                    }],
                    tenant_usage: vec![TenantUsage {
                        tenant: "acme".into(),
                        pods: 1,
                        cpu_millis: cpu,
                        memory_bytes: mem,
                        pids: seq,
                        cpu_split: seq % 2 == 0,
                        memory_pressure: seq % 3 == 0,
                    }],
                    firewall_displacements: generation / 5,
                    isolation: IsolationFigures {
                        firewall_applies: seq / 7,
                        firewall_apply_micros: seq,
                        firewall_last_apply_micros: seq / 11,
                        firewall_drift_repairs: generation / 3,
                        cgroup_passes: generation,
                        cgroup_pass_micros: cpu,
                        cgroup_last_pass_micros: mem,
                        cgroup_writes: seq / 13,
                    },
                    k3s: if generation % 2 == 0 {
                        crate::k3s::K3sState::Running { version: "v1.35.5+k3s1".into(), cluster_ca_sha256: None }
                    } else {
                        crate::k3s::K3sState::Failed { reason: format!("seq {seq}") }
                    },
                }
            })
    }
}
