//! Counters for `/metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::store::Health;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub reports: Counter,
    pub enrollments_accepted: Counter,
    pub handshake_failures: Counter,
    pub links_open: AtomicI64,
    /// Refused enrollments and links, by reason.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Pod ownership as last resolved: IPs left out of every set for having two owners, and per
    /// node the pod claims that were not taken.
    pod_ownership: Mutex<(usize, BTreeMap<String, usize>)>,
}

impl Metrics {
    pub fn refused(&self, reason: &str) {
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(reason.to_string()).or_default() += 1;
    }

    pub fn refusals(&self, reason: &str) -> u64 {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).get(reason).copied().unwrap_or(0)
    }

    /// Records pod ownership as it was just resolved (see [`crate::pod_owners::OwnerMap`]).
    pub fn set_pod_ownership(&self, conflicts: usize, refused: &BTreeMap<String, usize>) {
        *self.pod_ownership.lock().unwrap_or_else(|p| p.into_inner()) = (conflicts, refused.clone());
    }

    pub fn render(&self, health: &BTreeMap<Health, usize>) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP hexa_nodes Enrolled nodes by health.\n# TYPE hexa_nodes gauge");
        for state in [Health::Pending, Health::Ready, Health::Unreachable, Health::Lost] {
            let n = health.get(&state).copied().unwrap_or(0);
            let _ = writeln!(out, "hexa_nodes{{health=\"{}\"}} {n}", format!("{state:?}").to_lowercase());
        }
        let _ =
            writeln!(out, "# HELP hexa_reports_total Capacity reports received.\n# TYPE hexa_reports_total counter");
        let _ = writeln!(out, "hexa_reports_total {}", self.reports.get());
        let _ = writeln!(out, "# HELP hexa_enrollments_total Nodes enrolled.\n# TYPE hexa_enrollments_total counter");
        let _ = writeln!(out, "hexa_enrollments_total {}", self.enrollments_accepted.get());
        let _ = writeln!(
            out,
            "# HELP hexa_refusals_total Enrollments and links refused, by reason.\n# TYPE hexa_refusals_total counter"
        );
        for (reason, n) in self.refusals.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "hexa_refusals_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP hexa_handshake_failures_total QUIC/TLS handshakes that failed.\n# TYPE hexa_handshake_failures_total counter"
        );
        let _ = writeln!(out, "hexa_handshake_failures_total {}", self.handshake_failures.get());
        let _ = writeln!(out, "# HELP hexa_links_open Open node links.\n# TYPE hexa_links_open gauge");
        let _ = writeln!(out, "hexa_links_open {}", self.links_open.load(Ordering::Relaxed));
        let (conflicts, refused) = self.pod_ownership.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(
            out,
            "# HELP hexa_pod_ip_conflicts Pod IPs claimed by two owners, left out of every set.\n# TYPE hexa_pod_ip_conflicts gauge"
        );
        let _ = writeln!(out, "hexa_pod_ip_conflicts {conflicts}");
        let _ = writeln!(
            out,
            "# HELP hexa_pod_claims_refused Pod IP claims not taken, by the node that made them.\n# TYPE hexa_pod_claims_refused gauge"
        );
        for (node, n) in &refused {
            let _ = writeln!(out, "hexa_pod_claims_refused{{node=\"{node}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ownership_is_rendered_as_gauges() {
        let metrics = Metrics::default();
        let none = metrics.render(&BTreeMap::new());
        assert!(none.contains("hexa_pod_ip_conflicts 0\n") && !none.contains("hexa_pod_claims_refused{"), "{none}");
        metrics.set_pod_ownership(2, &BTreeMap::from([("liar".to_string(), 5)]));
        let text = metrics.render(&BTreeMap::new());
        assert!(text.contains("hexa_pod_ip_conflicts 2\n"), "{text}");
        assert!(text.contains("hexa_pod_claims_refused{node=\"liar\"} 5\n"), "{text}");
    }
}
