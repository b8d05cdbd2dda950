//! Room on a node: the three quantities a share reserves.

use serde::{Deserialize, Serialize};

use hexa_shared::report::Resources;
use hexa_shared::tenant::ShareSize;

use super::PlacementConfig;

/// CPU, memory and pods, as capacity, reservation or free room.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Room {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u64,
}

/// The resource a share is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    Cpu,
    Memory,
}

impl Room {
    pub fn of(share: &ShareSize) -> Room {
        Room { cpu_millis: share.cpu_millis, memory_bytes: share.memory_bytes, pods: u64::from(share.pods) }
    }

    /// True when `need` fits in `self` on every resource.
    pub fn fits(&self, need: &Room) -> bool {
        self.cpu_millis >= need.cpu_millis && self.memory_bytes >= need.memory_bytes && self.pods >= need.pods
    }

    pub fn is_zero(&self) -> bool {
        *self == Room::default()
    }

    pub fn saturating_sub(&self, other: &Room) -> Room {
        Room {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            pods: self.pods.saturating_sub(other.pods),
        }
    }

    pub fn saturating_add(&self, other: &Room) -> Room {
        Room {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            pods: self.pods.saturating_add(other.pods),
        }
    }

    pub(crate) fn get(&self, dim: Dim) -> u64 {
        match dim {
            Dim::Cpu => self.cpu_millis,
            Dim::Memory => self.memory_bytes,
        }
    }

    /// The resource `self` needs most of relative to `total` (CPU on a tie or an empty fleet).
    pub(crate) fn dominant(&self, total: &Room) -> Dim {
        let cpu = u128::from(self.cpu_millis) * u128::from(total.memory_bytes);
        let mem = u128::from(self.memory_bytes) * u128::from(total.cpu_millis);
        if mem > cpu { Dim::Memory } else { Dim::Cpu }
    }
}

fn scaled(value: u64, ratio: f64) -> u64 {
    // Quantities are far below 2^53, so f64 is exact enough; the result is floored.
    (value as f64 * ratio).floor() as u64
}

fn headroom(value: u64, fraction: f64) -> u64 {
    (value as f64 * fraction).ceil() as u64
}

/// What shares may reserve on a shared node in total: `allocatable x overcommit - headroom`.
pub(crate) fn usable_capacity(allocatable: &Resources, config: &PlacementConfig) -> Room {
    Room {
        cpu_millis: scaled(allocatable.cpu_millis, config.cpu_overcommit)
            .saturating_sub(headroom(allocatable.cpu_millis, config.headroom)),
        memory_bytes: scaled(allocatable.memory_bytes, config.memory_overcommit)
            .saturating_sub(headroom(allocatable.memory_bytes, config.headroom)),
        pods: u64::from(allocatable.pods),
    }
}

/// The live memory bound: `MemAvailable` less the headroom.
pub(crate) fn live_memory(allocatable: &Resources, memory_available: u64, config: &PlacementConfig) -> u64 {
    memory_available.saturating_sub(headroom(allocatable.memory_bytes, config.headroom))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn usable_capacity_applies_overcommit_then_headroom() {
        let config =
            PlacementConfig { cpu_overcommit: 2.0, memory_overcommit: 1.0, headroom: 0.1, ..Default::default() };
        let alloc = Resources { cpu_millis: 8000, memory_bytes: 32 * GIB, ephemeral_bytes: 0, pods: 110 };
        let cap = usable_capacity(&alloc, &config);
        assert_eq!(cap.cpu_millis, 16_000 - 800);
        assert_eq!(cap.memory_bytes, 32 * GIB - (32 * GIB).div_ceil(10));
        assert_eq!(cap.pods, 110);
        assert_eq!(live_memory(&alloc, 10 * GIB, &config), 10 * GIB - (32 * GIB).div_ceil(10));
        assert_eq!(live_memory(&alloc, GIB, &config), 0);
    }

    #[test]
    fn dominant_resource_is_relative_to_the_fleet() {
        let fleet = Room { cpu_millis: 100_000, memory_bytes: 400 * GIB, pods: 1000 };
        let cpu_heavy = Room { cpu_millis: 2000, memory_bytes: 4 * GIB, pods: 1 };
        let mem_heavy = Room { cpu_millis: 500, memory_bytes: 4 * GIB, pods: 1 };
        assert_eq!(cpu_heavy.dominant(&fleet), Dim::Cpu);
        assert_eq!(mem_heavy.dominant(&fleet), Dim::Memory);
        assert_eq!(mem_heavy.dominant(&Room::default()), Dim::Cpu);
    }
}
