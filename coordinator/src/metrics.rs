//! What `/metrics` exports, in the Prometheus text format (0.0.4).
//!
//! Figures the coordinator counts as things happen (reports, refusals, placements) are atomics,
//! cheap enough for the report path; figures that describe the fleet as it is now (nodes by
//! health, tenants by phase, VMs by state, each node's own figures) are read when scraped and
//! handed to [`Metrics::render`] as a [`Fleet`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hexa_shared::report::IsolationFigures;
use hexa_shared::tenant::Phase;

use crate::proxmox::VmState;
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

/// A Prometheus histogram over fixed upper bounds (seconds), lock-free: one atomic per bucket and
/// one for the sum (in microseconds). The count is the buckets' total, so `+Inf` and `_count`
/// always agree, even while observations land during a scrape.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then the one above every bound; not cumulative (rendering adds them up).
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// A histogram with `bounds`, which must be increasing.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "histogram bounds must increase");
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = self.bounds.iter().position(|&bound| seconds <= bound).unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` with `labels` (`key="value"`
    /// pairs, comma-separated, or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Report lag: sub-millisecond on a quiet loopback, seconds when the coordinator falls behind.
const REPORT_LAG_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Placement: milliseconds for a shared tenant, minutes to an hour for VMs to be made and register.
const PLACEMENT_BOUNDS: &[f64] =
    &[0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];

/// A report stamped this far in the future is still taken as lag 0 (clocks a little apart).
const REPORT_CLOCK_TOLERANCE_MS: u64 = 1_000;
/// A report older than this when recorded says more about the node's clock than about the lag.
const REPORT_LAG_LIMIT_MS: u64 = 300_000;

/// The two plans, as label values.
const PLANS: [&str; 2] = ["shared", "dedicated"];

fn plan_index(plan: &str) -> usize {
    usize::from(plan == "dedicated")
}

#[derive(Debug)]
pub struct Metrics {
    pub reports: Counter,
    pub enrollments_accepted: Counter,
    pub handshake_failures: Counter,
    pub links_open: AtomicI64,
    /// From each report's collection on its node to its being recorded here.
    report_lag: Histogram,
    /// Reports whose stamp was too far ahead or behind to be a lag (see [`Metrics::report_recorded`]).
    report_clock_skew: Counter,
    /// Per plan ([`PLANS`]): placement decisions that changed where a tenant runs.
    placements: [Counter; 2],
    /// Per plan: from a tenant's creation or plan change to its being placed.
    placement_latency: [Histogram; 2],
    /// Refused enrollments and links, by reason.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Pod ownership as last resolved: IPs left out of every set for having two owners, and per
    /// node the pod claims that were not taken.
    pod_ownership: Mutex<(usize, BTreeMap<String, usize>)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reports: Counter::default(),
            enrollments_accepted: Counter::default(),
            handshake_failures: Counter::default(),
            links_open: AtomicI64::default(),
            report_lag: Histogram::new(REPORT_LAG_BOUNDS),
            report_clock_skew: Counter::default(),
            placements: Default::default(),
            placement_latency: [Histogram::new(PLACEMENT_BOUNDS), Histogram::new(PLACEMENT_BOUNDS)],
            refusals: Mutex::default(),
            pod_ownership: Mutex::default(),
        }
    }
}

/// The fleet as it is when scraped.
#[derive(Debug, Default)]
pub struct Fleet {
    pub health: BTreeMap<Health, usize>,
    pub tenants: BTreeMap<Phase, usize>,
    /// Proxmox VMs by state; `None` when no provisioner is configured.
    pub vms: Option<BTreeMap<VmState, usize>>,
    pub nodes: Vec<NodeFigures>,
}

/// One node's figures: what the coordinator saw of it, and what its own latest report says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeFigures {
    /// From the node's certificate.
    pub node: String,
    /// Links opened after a first one, since this coordinator started.
    pub link_reconnects: u64,
    /// From its latest report, if any.
    pub reported: Option<ReportedFigures>,
}

/// What a node says of itself; it speaks for its own series only.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReportedFigures {
    pub isolation: IsolationFigures,
    pub firewall_displacements: u64,
}

const PHASES: [Phase; 6] =
    [Phase::Pending, Phase::Provisioning, Phase::Deploying, Phase::Ready, Phase::Degraded, Phase::Deleting];
const VM_STATES: [VmState; 9] = [
    VmState::Requested,
    VmState::Cloning,
    VmState::Configuring,
    VmState::Starting,
    VmState::WaitingForRegistration,
    VmState::Bound,
    VmState::Draining,
    VmState::Stopping,
    VmState::Destroying,
];

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escaped(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn micros_as_seconds(micros: u64) -> f64 {
    micros as f64 / 1e6
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

    /// Counts a report its node collected at `collected_at_unix_ms` (its clock) and the inventory
    /// recorded at `recorded_at_unix_ms` (ours). The lag is only as good as the two clocks: a stamp
    /// up to a second in the future counts as lag 0, and one further ahead, or more than five
    /// minutes old, is not a lag but a wrong clock: it is counted in `hexa_report_clock_skew_total`
    /// and left out of the histogram, so one node's clock cannot drag the fleet's quantiles.
    pub fn report_recorded(&self, collected_at_unix_ms: u64, recorded_at_unix_ms: u64) {
        self.reports.inc();
        let lag_ms = match recorded_at_unix_ms.checked_sub(collected_at_unix_ms) {
            Some(lag) if lag <= REPORT_LAG_LIMIT_MS => lag,
            None if collected_at_unix_ms - recorded_at_unix_ms <= REPORT_CLOCK_TOLERANCE_MS => 0,
            _ => return self.report_clock_skew.inc(),
        };
        self.report_lag.observe(Duration::from_millis(lag_ms));
    }

    /// Counts a placement decision that changed where a tenant on `plan` (`shared`, `dedicated`) runs.
    pub fn placement_made(&self, plan: &str) {
        self.placements[plan_index(plan)].inc();
    }

    /// Observes how long a tenant on `plan` waited from its creation or plan change to being placed.
    pub fn placement_completed(&self, plan: &str, waited: Duration) {
        self.placement_latency[plan_index(plan)].observe(waited);
    }

    pub fn render(&self, fleet: &Fleet) -> String {
        let mut text = String::new();
        let out = &mut text;
        header(out, "hexa_nodes", "gauge", "Enrolled nodes by health.");
        for state in [Health::Pending, Health::Ready, Health::Unreachable, Health::Lost] {
            let n = fleet.health.get(&state).copied().unwrap_or(0);
            let _ = writeln!(out, "hexa_nodes{{health=\"{}\"}} {n}", format!("{state:?}").to_lowercase());
        }
        header(out, "hexa_reports_total", "counter", "Capacity reports received.");
        let _ = writeln!(out, "hexa_reports_total {}", self.reports.get());
        header(
            out,
            "hexa_report_lag_seconds",
            "histogram",
            "From a report's collection on its node to its being recorded here, by the two clocks; reports stamped over 1s ahead or 5min behind are left out (see hexa_report_clock_skew_total).",
        );
        self.report_lag.render(out, "hexa_report_lag_seconds", "");
        header(
            out,
            "hexa_report_clock_skew_total",
            "counter",
            "Reports stamped over 1s in the future or over 5min in the past: the node's clock is off.",
        );
        let _ = writeln!(out, "hexa_report_clock_skew_total {}", self.report_clock_skew.get());
        header(out, "hexa_enrollments_total", "counter", "Nodes enrolled.");
        let _ = writeln!(out, "hexa_enrollments_total {}", self.enrollments_accepted.get());
        header(out, "hexa_refusals_total", "counter", "Enrollments and links refused, by reason.");
        for (reason, n) in self.refusals.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "hexa_refusals_total{{reason=\"{}\"}} {n}", escaped(reason));
        }
        header(out, "hexa_handshake_failures_total", "counter", "QUIC/TLS handshakes that failed.");
        let _ = writeln!(out, "hexa_handshake_failures_total {}", self.handshake_failures.get());
        header(out, "hexa_links_open", "gauge", "Open node links.");
        let _ = writeln!(out, "hexa_links_open {}", self.links_open.load(Ordering::Relaxed));
        let (conflicts, refused) = self.pod_ownership.lock().unwrap_or_else(|p| p.into_inner()).clone();
        header(out, "hexa_pod_ip_conflicts", "gauge", "Pod IPs claimed by two owners, left out of every set.");
        let _ = writeln!(out, "hexa_pod_ip_conflicts {conflicts}");
        header(out, "hexa_pod_claims_refused", "gauge", "Pod IP claims not taken, by the node that made them.");
        for (node, n) in &refused {
            let _ = writeln!(out, "hexa_pod_claims_refused{{node=\"{}\"}} {n}", escaped(node));
        }

        header(
            out,
            "hexa_placements_total",
            "counter",
            "Placement decisions that changed where a tenant runs (created, plan changed, moved off a drained or lost node, dedicated nodes bound), by plan.",
        );
        for (i, plan) in PLANS.iter().enumerate() {
            let _ = writeln!(out, "hexa_placements_total{{plan=\"{plan}\"}} {}", self.placements[i].get());
        }
        header(
            out,
            "hexa_placement_seconds",
            "histogram",
            "From a tenant's creation or plan change to its being placed whole, by plan: the decision and its durable write for shared tenants, until their nodes are bound for dedicated ones. Requests made since this coordinator started.",
        );
        for (i, plan) in PLANS.iter().enumerate() {
            self.placement_latency[i].render(out, "hexa_placement_seconds", &format!("plan=\"{plan}\""));
        }
        header(out, "hexa_tenants", "gauge", "Tenants by phase.");
        for phase in PHASES {
            let n = fleet.tenants.get(&phase).copied().unwrap_or(0);
            let _ = writeln!(out, "hexa_tenants{{phase=\"{}\"}} {n}", phase.to_string().to_lowercase());
        }
        header(
            out,
            "hexa_provisioning_vms",
            "gauge",
            "Proxmox VMs for dedicated nodes by state (all zero without a provisioner).",
        );
        for state in VM_STATES {
            let n = fleet.vms.as_ref().and_then(|vms| vms.get(&state)).copied().unwrap_or(0);
            let _ = writeln!(out, "hexa_provisioning_vms{{state=\"{state}\"}} {n}");
        }
        header(
            out,
            "hexa_link_reconnects_total",
            "counter",
            "Links a node opened after a first one, since this coordinator started.",
        );
        for node in &fleet.nodes {
            let _ = writeln!(
                out,
                "hexa_link_reconnects_total{{node=\"{}\"}} {}",
                escaped(&node.node),
                node.link_reconnects
            );
        }
        self.render_reported(out, &fleet.nodes);
        text
    }

    /// Each node's own figures from its latest report, under its own name only.
    fn render_reported(&self, out: &mut String, nodes: &[NodeFigures]) {
        let reported: Vec<(String, &ReportedFigures)> =
            nodes.iter().filter_map(|n| n.reported.as_ref().map(|r| (escaped(&n.node), r))).collect();
        header(
            out,
            "hexa_isolation_apply_seconds",
            "summary",
            "Time the node's agent spent enforcing isolation, as it reports: part=firewall counts reconciles that wrote a batch, part=cgroup every governor pass.",
        );
        for (node, r) in &reported {
            let i = &r.isolation;
            for (part, micros, count) in [
                ("firewall", i.firewall_apply_micros, i.firewall_applies),
                ("cgroup", i.cgroup_pass_micros, i.cgroup_passes),
            ] {
                let labels = format!("node=\"{node}\",part=\"{part}\"");
                let _ = writeln!(out, "hexa_isolation_apply_seconds_sum{{{labels}}} {}", micros_as_seconds(micros));
                let _ = writeln!(out, "hexa_isolation_apply_seconds_count{{{labels}}} {count}");
            }
        }
        header(
            out,
            "hexa_isolation_last_apply_seconds",
            "gauge",
            "The node's last firewall apply and last cgroup pass, as it reports.",
        );
        for (node, r) in &reported {
            let i = &r.isolation;
            for (part, micros) in [("firewall", i.firewall_last_apply_micros), ("cgroup", i.cgroup_last_pass_micros)] {
                let seconds = micros_as_seconds(micros);
                let _ = writeln!(out, "hexa_isolation_last_apply_seconds{{node=\"{node}\",part=\"{part}\"}} {seconds}");
            }
        }
        header(
            out,
            "hexa_isolation_drift_repairs_total",
            "counter",
            "Firewall reconciles on the node that found its rules changed by something else and put them back, as it reports (since its agent started).",
        );
        for (node, r) in &reported {
            let n = r.isolation.firewall_drift_repairs;
            let _ = writeln!(out, "hexa_isolation_drift_repairs_total{{node=\"{node}\"}} {n}");
        }
        header(
            out,
            "hexa_firewall_displacements_total",
            "counter",
            "Drift repairs that only had to put the node's jumps back in front of another program's rules, as it reports.",
        );
        for (node, r) in &reported {
            let _ = writeln!(out, "hexa_firewall_displacements_total{{node=\"{node}\"}} {}", r.firewall_displacements);
        }
        header(
            out,
            "hexa_cgroup_writes_total",
            "counter",
            "cgroup limits the node's governor set or changed, as it reports.",
        );
        for (node, r) in &reported {
            let _ = writeln!(out, "hexa_cgroup_writes_total{{node=\"{node}\"}} {}", r.isolation.cgroup_writes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples of `name` in `text`: (labels, value).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, labels) = match series.split_once('{') {
                    Some((metric, labels)) => (metric, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                (metric == name).then(|| (labels, value.parse().unwrap()))
            })
            .collect()
    }

    #[test]
    fn pod_ownership_is_rendered_as_gauges() {
        let metrics = Metrics::default();
        let none = metrics.render(&Fleet::default());
        assert!(none.contains("hexa_pod_ip_conflicts 0\n") && !none.contains("hexa_pod_claims_refused{"), "{none}");
        metrics.set_pod_ownership(2, &BTreeMap::from([("liar".to_string(), 5)]));
        let text = metrics.render(&Fleet::default());
        assert!(text.contains("hexa_pod_ip_conflicts 2\n"), "{text}");
        assert!(text.contains("hexa_pod_claims_refused{node=\"liar\"} 5\n"), "{text}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let histogram = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [0, 5, 10, 11, 50, 100, 700, 1000, 1001, 60_000] {
            histogram.observe(Duration::from_millis(ms));
        }
        let mut text = String::new();
        histogram.render(&mut text, "x_seconds", "plan=\"shared\"");
        let buckets = samples(&text, "x_seconds_bucket");
        let expected = [
            ("plan=\"shared\",le=\"0.01\"", 3.0),
            ("plan=\"shared\",le=\"0.1\"", 6.0),
            ("plan=\"shared\",le=\"1\"", 8.0),
            ("plan=\"shared\",le=\"+Inf\"", 10.0),
        ];
        assert_eq!(buckets, expected, "{text}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{text}");
        assert_eq!(samples(&text, "x_seconds_count"), [("plan=\"shared\"", 10.0)], "{text}");
        let sum = samples(&text, "x_seconds_sum")[0].1;
        assert!((sum - 62.877).abs() < 1e-9, "{text}");
        assert_eq!(histogram.count(), 10);
    }

    #[test]
    fn report_lag_leaves_wrong_clocks_out() {
        let metrics = Metrics::default();
        let now = 1_800_000_000_000;
        metrics.report_recorded(now - 3, now);
        metrics.report_recorded(now + 500, now); // a little ahead: lag 0
        metrics.report_recorded(now + 60_000, now); // a minute ahead: a wrong clock
        metrics.report_recorded(0, now); // a node that never set its clock
        let text = metrics.render(&Fleet::default());
        assert_eq!(samples(&text, "hexa_reports_total"), [("", 4.0)]);
        assert_eq!(samples(&text, "hexa_report_lag_seconds_count"), [("", 2.0)], "{text}");
        assert_eq!(samples(&text, "hexa_report_clock_skew_total"), [("", 2.0)], "{text}");
        let first = samples(&text, "hexa_report_lag_seconds_bucket")[0];
        assert_eq!(first, ("le=\"0.001\"", 1.0), "{text}");
        assert_eq!(samples(&text, "hexa_report_lag_seconds_sum"), [("", 0.003)], "{text}");
    }

    #[test]
    fn placements_and_fleet_gauges_have_every_label_value() {
        let metrics = Metrics::default();
        metrics.placement_made("dedicated");
        metrics.placement_completed("dedicated", Duration::from_secs(90));
        let fleet = Fleet {
            tenants: BTreeMap::from([(Phase::Ready, 2), (Phase::Provisioning, 1)]),
            vms: Some(BTreeMap::from([(VmState::WaitingForRegistration, 1)])),
            ..Fleet::default()
        };
        let text = metrics.render(&fleet);
        assert_eq!(
            samples(&text, "hexa_placements_total"),
            [("plan=\"shared\"", 0.0), ("plan=\"dedicated\"", 1.0)],
            "{text}"
        );
        let counts = samples(&text, "hexa_placement_seconds_count");
        assert_eq!(counts, [("plan=\"shared\"", 0.0), ("plan=\"dedicated\"", 1.0)], "{text}");
        let tenants = samples(&text, "hexa_tenants");
        assert_eq!(tenants.len(), PHASES.len(), "{text}");
        assert!(tenants.contains(&("phase=\"ready\"", 2.0)) && tenants.contains(&("phase=\"pending\"", 0.0)));
        let vms = samples(&text, "hexa_provisioning_vms");
        assert_eq!(vms.len(), VM_STATES.len(), "{text}");
        assert!(vms.contains(&("state=\"waiting_for_registration\"", 1.0)), "{text}");
    }

    #[test]
    fn a_node_figures_appear_under_its_own_name_only() {
        let metrics = Metrics::default();
        let isolation = IsolationFigures {
            firewall_applies: 4,
            firewall_apply_micros: 2_500_000,
            firewall_last_apply_micros: 125_000,
            firewall_drift_repairs: 3,
            cgroup_passes: 10,
            cgroup_pass_micros: 50_000,
            cgroup_last_pass_micros: 4_000,
            cgroup_writes: 7,
        };
        let fleet = Fleet {
            nodes: vec![
                NodeFigures {
                    node: "n1".into(),
                    link_reconnects: 2,
                    reported: Some(ReportedFigures { isolation, firewall_displacements: 1 }),
                },
                NodeFigures { node: "quiet".into(), link_reconnects: 0, reported: None },
            ],
            ..Fleet::default()
        };
        let text = metrics.render(&fleet);
        assert_eq!(
            samples(&text, "hexa_link_reconnects_total"),
            [("node=\"n1\"", 2.0), ("node=\"quiet\"", 0.0)],
            "{text}"
        );
        assert_eq!(
            samples(&text, "hexa_isolation_apply_seconds_sum"),
            [("node=\"n1\",part=\"firewall\"", 2.5), ("node=\"n1\",part=\"cgroup\"", 0.05)],
            "{text}"
        );
        assert_eq!(
            samples(&text, "hexa_isolation_apply_seconds_count"),
            [("node=\"n1\",part=\"firewall\"", 4.0), ("node=\"n1\",part=\"cgroup\"", 10.0)]
        );
        assert_eq!(
            samples(&text, "hexa_isolation_last_apply_seconds"),
            [("node=\"n1\",part=\"firewall\"", 0.125), ("node=\"n1\",part=\"cgroup\"", 0.004)]
        );
        assert_eq!(samples(&text, "hexa_isolation_drift_repairs_total"), [("node=\"n1\"", 3.0)]);
        assert_eq!(samples(&text, "hexa_firewall_displacements_total"), [("node=\"n1\"", 1.0)]);
        assert_eq!(samples(&text, "hexa_cgroup_writes_total"), [("node=\"n1\"", 7.0)]);
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::default();
        metrics.refused("a \"quoted\"\nreason\\");
        let text = metrics.render(&Fleet::default());
        assert!(text.contains(r#"hexa_refusals_total{reason="a \"quoted\"\nreason\\"} 1"#), "{text}");
    }
}
