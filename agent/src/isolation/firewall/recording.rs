//! A wrapper that records the batches applied through a firewall.

use std::sync::Mutex;

use super::plan::Batch;
use super::ruleset::Ruleset;
use super::{Firewall, FirewallError};

/// Wraps a firewall and records every batch applied through it, so that a test can prove that a
/// reconcile wrote nothing.
#[derive(Debug)]
pub struct Recording<F> {
    inner: F,
    writes: Mutex<Vec<Batch>>,
}

impl<F: Firewall> Recording<F> {
    pub fn new(inner: F) -> Recording<F> {
        Recording { inner, writes: Mutex::new(Vec::new()) }
    }

    /// Every batch passed to `apply`, including those that failed.
    pub fn writes(&self) -> Vec<Batch> {
        self.writes.lock().map(|w| w.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn inner(&self) -> &F {
        &self.inner
    }
}

impl<F: Firewall> Firewall for Recording<F> {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        self.inner.current()
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        match self.writes.lock() {
            Ok(mut writes) => writes.push(batch.clone()),
            Err(poisoned) => poisoned.into_inner().push(batch.clone()),
        }
        self.inner.apply(batch)
    }

    fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError> {
        self.inner.ensure_bridge_filtering()
    }
}
