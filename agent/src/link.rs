//! The agent's side of the link: one long-lived mutual-TLS QUIC connection to the coordinator,
//! re-established with jittered exponential backoff whenever it drops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME};
use hexa_shared::proto::{
    AgentMessage, CoordinatorMessage, Hello, PROTOCOL_VERSION, RefusalCode, SystemInfo, close_code,
};
use hexa_shared::report::CapacityReport;
use hexa_shared::spec::{AppliedStatus, ApplyOutcome, NodeSpec};
use hexa_shared::wire::{self, FrameError};

use hexa_shared::k3s::K3sState;
use tokio::task::JoinHandle;

use crate::AgentError;
use crate::apply::Applier;
use crate::collector::Collector;
use crate::enroll::new_key_and_csr;
use crate::state::StateDir;

/// A spec whose apply failed is tried again after this long.
const APPLY_RETRY: Duration = Duration::from_secs(30);
/// K3s state is looked at this often (it runs `systemctl` and `kubectl`).
const K3S_OBSERVE_EVERY: Duration = Duration::from_secs(15);
/// The node's pods are listed this often (for the report; the coordinator builds IP sets from them).
const PODS_EVERY: Duration = Duration::from_secs(5);
/// Tenants' pod cgroups are brought in line with their allocations this often.
const GOVERN_EVERY: Duration = Duration::from_secs(10);
/// The firewall is compared with the applied isolation this often, and hand-made drift undone.
const FIREWALL_RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay: a coordinator that comes back is found within this (plus handshake).
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Delay before reconnect attempt `attempt` (0-based): exponential, capped, with "equal jitter"
/// (half fixed, half random) so that a fleet that lost its coordinator does not return in lockstep.
/// `random` is in `[0, 1)`.
pub fn backoff_delay(attempt: u32, random: f64) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    ceiling / 2 + ceiling.mul_f64(random.clamp(0.0, 1.0) / 2.0)
}

/// The coordinator acknowledges every report; after this many silent intervals (and at least
/// [`MIN_SILENCE`]) the link is presumed dead. QUIC's idle timeout alone would take longer, and a
/// coordinator restarted on the same address cannot reset connections it no longer knows.
const SILENT_INTERVALS: u32 = 3;
const MIN_SILENCE: Duration = Duration::from_secs(3);

/// Fraction of a certificate's lifetime after which the agent asks for a new one.
const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;

pub fn renewal_due(not_before_unix: i64, not_after_unix: i64, now_unix: i64) -> bool {
    let lifetime = (not_after_unix - not_before_unix).max(0) as f64;
    now_unix as f64 >= not_before_unix as f64 + lifetime * RENEW_AT_FRACTION
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_unix_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

pub fn system_info() -> SystemInfo {
    SystemInfo {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// How a session ended.
enum SessionEnd {
    /// The connection was up and working; reconnect promptly.
    Dropped(String),
    /// Could not get a working session; back off.
    Failed(String),
    /// Asked to stop.
    Shutdown,
}

type ApplyJob = JoinHandle<(NodeSpec, Result<(), String>)>;

#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    state: StateDir,
    collector: Collector,
    applier: Applier,
    applied: Option<NodeSpec>,
    seq: u64,
    /// The apply running now. Applies run beside the link so that a long K3s download never
    /// stops reports.
    applying: Option<ApplyJob>,
    /// The newest spec that arrived while another was being applied.
    queued: Option<NodeSpec>,
    /// A spec whose apply failed, and when to try it again.
    retry: Option<(NodeSpec, Instant)>,
    /// Apply results the coordinator has not been told yet (the link may drop meanwhile).
    unsent: Vec<AppliedStatus>,
    k3s_state: K3sState,
    observing: Option<JoinHandle<K3sState>>,
    observed_at: Option<Instant>,
    /// When the firewall was last reconciled outside an apply.
    firewall_checked_at: Instant,
    pod_source: std::sync::Arc<dyn crate::pods::PodSource>,
    pods: Vec<hexa_shared::report::PodInfo>,
    listing: Option<JoinHandle<Result<Vec<hexa_shared::report::PodInfo>, String>>>,
    listed_at: Option<Instant>,
    /// The cgroup governor; it runs on a blocking thread and comes back with the usage it read.
    governor: Option<crate::isolation::cgroup::Governor>,
    cgroup_root: std::path::PathBuf,
    governing: Option<JoinHandle<(crate::isolation::cgroup::Governor, Vec<hexa_shared::report::TenantUsage>)>>,
    governed_at: Option<Instant>,
    tenant_usage: Vec<hexa_shared::report::TenantUsage>,
}

/// Waits for a background job, or forever when there is none (for use in `select!`).
async fn finished<T>(job: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match job {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

impl Link {
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        state: StateDir,
        collector: Collector,
        applier: Applier,
        applied: Option<NodeSpec>,
        host: &crate::Host,
    ) -> Link {
        Link {
            endpoint,
            addr,
            state,
            collector,
            applier,
            applied,
            seq: 0,
            applying: None,
            queued: None,
            retry: None,
            unsent: Vec::new(),
            k3s_state: K3sState::NotInstalled,
            observing: None,
            observed_at: None,
            firewall_checked_at: Instant::now(),
            pod_source: host.pods.clone(),
            pods: Vec::new(),
            listing: None,
            listed_at: None,
            governor: None,
            cgroup_root: host.cgroup_root.clone(),
            governing: None,
            governed_at: None,
            tenant_usage: Vec::new(),
        }
    }

    /// Keeps the link up until `shutdown` turns true. Only errors no retry can fix end it early.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        // Fail-static: the last applied spec is enforced again at once, coordinator or not.
        if let Some(spec) = self.applied.clone() {
            self.start_apply(spec);
        }
        let mut attempt = 0u32;
        loop {
            match self.session(&mut shutdown).await? {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Dropped(reason) => {
                    warn!(%reason, "link lost; reconnecting");
                    attempt = 0;
                }
                SessionEnd::Failed(reason) => {
                    warn!(%reason, attempt, "cannot reach the coordinator");
                }
            }
            let delay = backoff_delay(attempt, rand::rng().random::<f64>());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, AgentError> {
        let identity = self.state.load_identity()?;
        let config = pki::link_client_config(&identity.ca, identity.chain.clone(), identity.key_der()?)?;
        let connecting = match self.endpoint.connect_with(config, self.addr, COORDINATOR_SERVER_NAME) {
            Ok(c) => c,
            Err(e) => return Ok(SessionEnd::Failed(e.to_string())),
        };
        let conn = tokio::select! {
            conn = connecting => match conn {
                Ok(conn) => conn,
                Err(e) => return Ok(SessionEnd::Failed(e.to_string())),
            },
            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return Ok(SessionEnd::Failed(e.to_string())),
        };
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            node_name: identity.node_name.clone(),
            applied_generation: self.applied.as_ref().map_or(0, |s| s.generation),
            system: system_info(),
        };
        if let Err(e) = wire::write_frame(&mut send, &hello).await {
            return Ok(SessionEnd::Failed(e.to_string()));
        }
        let welcome = match tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut recv)).await {
            Err(_) => return Ok(SessionEnd::Failed("no welcome within 10s".into())),
            Ok(Err(e)) => return Ok(SessionEnd::Failed(close_reason(&conn).unwrap_or_else(|| e.to_string()))),
            Ok(Ok(None)) => return Ok(SessionEnd::Failed(close_reason(&conn).unwrap_or_else(|| "closed".into()))),
            Ok(Ok(Some(CoordinatorMessage::Welcome(welcome)))) => welcome,
            Ok(Ok(Some(CoordinatorMessage::Refused(refusal)))) => {
                return match refusal.code {
                    // Retrying cannot fix these: the operator must act.
                    RefusalCode::UnsupportedVersion
                    | RefusalCode::CertificateSuperseded
                    | RefusalCode::CertificateRevoked => Err(AgentError::Refused(refusal)),
                    _ => Ok(SessionEnd::Failed(refusal.to_string())),
                };
            }
            Ok(Ok(Some(other))) => return Ok(SessionEnd::Failed(format!("expected a welcome, got {other:?}"))),
        };
        let interval = Duration::from_millis(welcome.report_interval_ms.max(100));
        info!(node = %welcome.node_name, pool = %welcome.pool, interval_ms = welcome.report_interval_ms, "connected to the coordinator");

        // Frames are read in their own task: a partially read frame must never be dropped by select!.
        let (msg_tx, mut msg_rx) = mpsc::channel::<Result<CoordinatorMessage, FrameError>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let msg = wire::read_frame::<CoordinatorMessage, _>(&mut recv).await.transpose();
                let Some(msg) = msg else { break };
                let failed = msg.is_err();
                if msg_tx.send(msg).await.is_err() || failed {
                    break;
                }
            }
        });
        let end = self.exchange(&conn, &mut send, &mut msg_rx, interval, &identity, shutdown).await;
        reader.abort();
        if matches!(end, Ok(SessionEnd::Shutdown)) {
            conn.close(close_code::DONE.into(), b"agent stopping");
        }
        end
    }

    async fn exchange(
        &mut self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        msgs: &mut mpsc::Receiver<Result<CoordinatorMessage, FrameError>>,
        interval: Duration,
        identity: &crate::state::Identity,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AgentError> {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_key: Option<rcgen::KeyPair> = None;
        let (mut not_before, mut not_after) = (identity.not_before_unix, identity.not_after_unix);
        let mut sent_at: Option<(u64, Instant)> = None;
        let silence_limit = (interval * SILENT_INTERVALS).max(MIN_SILENCE);
        let mut last_heard = Instant::now();
        loop {
            let mut report_now = false;
            tokio::select! {
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return Ok(SessionEnd::Dropped(format!(
                            "no answer from the coordinator for {}ms", last_heard.elapsed().as_millis()
                        )));
                    }
                    report_now = true;
                }
                msg = msgs.recv() => match msg {
                    None => return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| "stream closed".into()))),
                    Some(Err(e)) => return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| e.to_string()))),
                    Some(Ok(CoordinatorMessage::Spec(spec))) => {
                        last_heard = Instant::now();
                        self.accept_spec(*spec);
                    }
                    Some(Ok(CoordinatorMessage::ReportAck { seq })) => {
                        last_heard = Instant::now();
                        if let Some((sent_seq, at)) = sent_at.take_if(|(s, _)| *s == seq) {
                            debug!(seq = sent_seq, rtt_us = at.elapsed().as_micros() as u64, "report acknowledged");
                        }
                    }
                    Some(Ok(CoordinatorMessage::CertificateRenewed { cert_chain_der })) => {
                        if let Some(key) = pending_key.take() {
                            self.state.save_renewal(&key.serialize_pem(), &cert_chain_der)?;
                            let renewed = self.state.load_identity()?;
                            (not_before, not_after) = (renewed.not_before_unix, renewed.not_after_unix);
                            info!(not_after_unix = not_after, "certificate renewed; used from the next connection");
                        }
                    }
                    Some(Ok(CoordinatorMessage::RenewalRefused(refusal))) => {
                        pending_key = None;
                        warn!(reason = %refusal, "certificate renewal refused");
                    }
                    Some(Ok(other)) => debug!(?other, "ignoring unexpected message"),
                },
                result = finished(&mut self.applying) => {
                    self.applying = None;
                    self.apply_finished(result);
                    // The applied generation changed: report at once rather than at the next tick.
                    report_now = true;
                }
                listed = finished(&mut self.listing) => {
                    self.listing = None;
                    match listed {
                        Ok(Ok(pods)) => {
                            // A change in the node's pods is news for the coordinator's IP sets.
                            report_now = pods != self.pods;
                            self.pods = pods;
                        }
                        Ok(Err(e)) => warn!(error = %e, "cannot list this node's pods; reporting the last list"),
                        Err(e) => warn!(error = %e, "pod listing task failed"),
                    }
                }
                governed = finished(&mut self.governing) => {
                    self.governing = None;
                    match governed {
                        Ok((governor, usage)) => {
                            self.governor = Some(governor);
                            self.tenant_usage = usage;
                        }
                        Err(e) => warn!(error = %e, "cgroup governor task failed; starting it afresh"),
                    }
                }
                state = finished(&mut self.observing) => {
                    self.observing = None;
                    let state = state.unwrap_or_else(|e| K3sState::Failed { reason: format!("observing k3s failed: {e}") });
                    report_now = state != self.k3s_state;
                    self.k3s_state = state;
                }
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
            for status in std::mem::take(&mut self.unsent) {
                if let Err(e) = wire::write_frame(send, &AgentMessage::Applied(status.clone())).await {
                    self.unsent.push(status);
                    return Ok(SessionEnd::Dropped(e.to_string()));
                }
            }
            self.background_work();
            if report_now {
                if let Some(report) = self.report() {
                    sent_at = Some((report.seq, Instant::now()));
                    if let Err(e) = wire::write_frame(send, &AgentMessage::Report(Box::new(report))).await {
                        return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| e.to_string())));
                    }
                }
                if pending_key.is_none() && renewal_due(not_before, not_after, now_unix()) {
                    let (key, csr_der) = new_key_and_csr()?;
                    pending_key = Some(key);
                    info!(not_after_unix = not_after, "asking for a new certificate");
                    if let Err(e) = wire::write_frame(send, &AgentMessage::RenewCertificate { csr_der }).await {
                        return Ok(SessionEnd::Dropped(e.to_string()));
                    }
                }
            }
        }
    }

    /// Runs the cgroup governor when it is due and the node hosts tenants: every pod of a tenant
    /// kept within the tenant's allocation here; the usage it reads goes into the reports.
    fn govern_if_due(&mut self) {
        let Some(spec) = self.applied.as_ref().filter(|s| !s.tenants.is_empty()) else { return };
        if self.governing.is_some() || self.governed_at.is_some_and(|at| at.elapsed() < GOVERN_EVERY) {
            return;
        }
        self.governed_at = Some(Instant::now());
        let mut governor = match self.governor.take() {
            Some(governor) => governor,
            None => match crate::isolation::cgroup::Governor::open(&self.cgroup_root, Default::default()) {
                Ok(governor) => governor,
                Err(e) => {
                    warn!(root = %self.cgroup_root.display(), error = %e, "cannot open the cgroup hierarchy; tenants are not governed");
                    return;
                }
            },
        };
        let allocations = spec.tenants.clone();
        let pods: Vec<crate::isolation::cgroup::PodTenant> = self
            .pods
            .iter()
            .filter_map(|p| {
                p.tenant.clone().map(|tenant| crate::isolation::cgroup::PodTenant { pod_uid: p.uid.clone(), tenant })
            })
            .collect();
        self.governing = Some(tokio::task::spawn_blocking(move || {
            let usage = match governor.reconcile(&allocations, &pods, std::time::Instant::now()) {
                Ok(done) => {
                    for failure in &done.failures {
                        warn!(?failure, "cannot govern a pod");
                    }
                    done.usage
                }
                Err(e) => {
                    warn!(error = %e, "cgroup governor failed");
                    Vec::new()
                }
            };
            (governor, usage)
        }));
    }

    /// Takes a spec from the coordinator: applied now, or after the one being applied.
    fn accept_spec(&mut self, spec: NodeSpec) {
        let generation = spec.generation;
        if self.applied.as_ref().is_some_and(|current| current.generation > generation) {
            warn!(generation, "ignoring a spec older than the one applied");
            self.unsent.push(AppliedStatus {
                generation,
                outcome: ApplyOutcome::Failed { reason: "older than the applied generation".into() },
            });
            return;
        }
        self.retry = None;
        if self.applying.is_some() {
            self.queued = Some(spec);
        } else {
            self.start_apply(spec);
        }
    }

    fn start_apply(&mut self, spec: NodeSpec) {
        let applier = self.applier.clone();
        info!(generation = spec.generation, "applying spec");
        self.k3s_state = if spec.k3s.is_some() { K3sState::Installing } else { self.k3s_state.clone() };
        self.applying = Some(tokio::spawn(async move {
            let result = applier.apply(&spec).await.map_err(|e| e.to_string());
            (spec, result)
        }));
    }

    fn apply_finished(&mut self, result: Result<(NodeSpec, Result<(), String>), tokio::task::JoinError>) {
        let (generation, outcome) = match result {
            Ok((spec, Ok(()))) => {
                info!(generation = spec.generation, "spec applied");
                let generation = spec.generation;
                self.applied = Some(spec);
                (generation, ApplyOutcome::Applied)
            }
            Ok((spec, Err(reason))) => {
                warn!(generation = spec.generation, %reason, retry_in_s = APPLY_RETRY.as_secs(), "cannot apply spec");
                let generation = spec.generation;
                if self.queued.is_none() {
                    self.retry = Some((spec, Instant::now() + APPLY_RETRY));
                }
                (generation, ApplyOutcome::Failed { reason })
            }
            Err(e) => (0, ApplyOutcome::Failed { reason: format!("apply task failed: {e}") }),
        };
        self.unsent.push(AppliedStatus { generation, outcome });
        // Look at K3s again now that it may have changed.
        self.observed_at = None;
    }

    /// Starts what is due: a queued or retried apply, a firewall drift check, a look at K3s.
    fn background_work(&mut self) {
        if self.applying.is_none() {
            if let Some(spec) = self.queued.take() {
                self.start_apply(spec);
            } else if let Some((spec, _)) = self.retry.take_if(|(_, at)| *at <= Instant::now()) {
                self.start_apply(spec);
            } else if self.firewall_checked_at.elapsed() >= FIREWALL_RECONCILE_EVERY {
                self.firewall_checked_at = Instant::now();
                if let Some(spec) = self.applied.clone().filter(|s| s.isolation.is_some()) {
                    let applier = self.applier.clone();
                    tokio::spawn(async move {
                        if let Err(e) = applier.enforce_isolation(&spec).await {
                            warn!(error = %e, "firewall drift check failed");
                        }
                    });
                }
            }
        }
        if self.listing.is_none() && self.listed_at.is_none_or(|at| at.elapsed() >= PODS_EVERY) {
            self.listed_at = Some(Instant::now());
            let source = self.pod_source.clone();
            let node = self.applied.as_ref().map(|s| s.node_name.clone()).unwrap_or_default();
            self.listing = Some(tokio::spawn(async move { source.pods(&node).await }));
        }
        self.govern_if_due();
        let due = self.observed_at.is_none_or(|at| at.elapsed() >= K3S_OBSERVE_EVERY);
        if due && self.applying.is_none() && self.observing.is_none() {
            self.observed_at = Some(Instant::now());
            let applier = self.applier.clone();
            let node = self.applied.as_ref().map(|s| s.node_name.clone()).unwrap_or_default();
            self.observing = Some(tokio::spawn(async move { applier.k3s_state(&node).await }));
        }
    }

    /// The next report, or `None` when the node cannot be sampled: a report of made-up figures
    /// would mislead placement, while a missing one shows up as the node's health.
    fn report(&mut self) -> Option<CapacityReport> {
        let sample = match self.collector.sample() {
            Ok(sample) => sample,
            Err(e) => {
                warn!(error = %e, "cannot sample capacity; skipping this report");
                return None;
            }
        };
        self.seq += 1;
        Some(CapacityReport {
            seq: self.seq,
            node_name: self.applied.as_ref().map(|s| s.node_name.clone()).unwrap_or_default(),
            collected_at_unix_ms: now_unix_ms(),
            capacity: sample.capacity,
            allocatable: sample.allocatable,
            usage: sample.usage,
            cgroup_limits: sample.cgroup_limits,
            applied_generation: self.applied.as_ref().map_or(0, |s| s.generation),
            k3s: self.k3s_state.clone(),
            pods: self.pods.clone(),
            tenant_usage: self.tenant_usage.clone(),
        })
    }
}

/// The reason the coordinator gave when it closed the connection, if it did.
fn close_reason(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Some(format!("coordinator closed the link: {}", String::from_utf8_lossy(&close.reason)))
        }
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff_delay(0, 0.0), BACKOFF_BASE / 2);
        assert_eq!(backoff_delay(1, 0.0), BACKOFF_BASE);
        assert!(backoff_delay(0, 0.999) < BACKOFF_BASE);
        for attempt in [5, 20, u32::MAX] {
            let d = backoff_delay(attempt, 0.999);
            assert!(d <= BACKOFF_MAX && d >= BACKOFF_MAX / 2, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn renewal_comes_after_two_thirds_of_the_lifetime() {
        assert!(!renewal_due(0, 300, 199));
        assert!(renewal_due(0, 300, 200));
        assert!(renewal_due(0, 0, 0));
    }
}
