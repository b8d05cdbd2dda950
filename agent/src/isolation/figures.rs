//! What enforcing isolation has cost this node and how often it had to be put right, counted
//! while the agent runs and sent in every report ([`IsolationFigures`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hexa_shared::report::IsolationFigures;

use super::firewall::{Reconciled, Ruleset};

/// The counters behind [`IsolationFigures`], shared by every task that enforces isolation.
#[derive(Debug, Default)]
pub struct IsolationCounters {
    firewall_applies: AtomicU64,
    firewall_apply_micros: AtomicU64,
    firewall_last_apply_micros: AtomicU64,
    firewall_drift_repairs: AtomicU64,
    cgroup_passes: AtomicU64,
    cgroup_pass_micros: AtomicU64,
    cgroup_last_pass_micros: AtomicU64,
    cgroup_writes: AtomicU64,
    /// The rules the last firewall reconcile brought the node to (`None` before the first one
    /// and after a failed one): a reconcile that wants the same rules and still has to write
    /// found them changed by something else.
    firewall_last_desired: Mutex<Option<Ruleset>>,
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

impl IsolationCounters {
    /// Counts one firewall reconcile to `desired` that took `elapsed` and ended with `outcome`
    /// (`None` when it failed). Returns whether it was a drift repair.
    pub fn firewall_reconciled(&self, desired: &Ruleset, outcome: Option<&Reconciled>, elapsed: Duration) -> bool {
        let mut last = self.firewall_last_desired.lock().unwrap_or_else(|p| p.into_inner());
        let Some(outcome) = outcome else {
            *last = None;
            return false;
        };
        let mut repaired = false;
        if let Reconciled::Applied { .. } = outcome {
            let took = micros(elapsed);
            self.firewall_applies.fetch_add(1, Ordering::Relaxed);
            self.firewall_apply_micros.fetch_add(took, Ordering::Relaxed);
            self.firewall_last_apply_micros.store(took, Ordering::Relaxed);
            repaired = last.as_ref() == Some(desired);
            if repaired {
                self.firewall_drift_repairs.fetch_add(1, Ordering::Relaxed);
            }
        }
        if last.as_ref() != Some(desired) {
            *last = Some(desired.clone());
        }
        repaired
    }

    /// Counts one cgroup governor pass that took `elapsed` and wrote `writes` files.
    pub fn cgroup_passed(&self, elapsed: Duration, writes: usize) {
        let took = micros(elapsed);
        self.cgroup_passes.fetch_add(1, Ordering::Relaxed);
        self.cgroup_pass_micros.fetch_add(took, Ordering::Relaxed);
        self.cgroup_last_pass_micros.store(took, Ordering::Relaxed);
        self.cgroup_writes.fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// The figures as they stand, for a report.
    pub fn figures(&self) -> IsolationFigures {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        IsolationFigures {
            firewall_applies: get(&self.firewall_applies),
            firewall_apply_micros: get(&self.firewall_apply_micros),
            firewall_last_apply_micros: get(&self.firewall_last_apply_micros),
            firewall_drift_repairs: get(&self.firewall_drift_repairs),
            cgroup_passes: get(&self.cgroup_passes),
            cgroup_pass_micros: get(&self.cgroup_pass_micros),
            cgroup_last_pass_micros: get(&self.cgroup_last_pass_micros),
            cgroup_writes: get(&self.cgroup_writes),
        }
    }
}
