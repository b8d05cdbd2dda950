//! The node supervisor: everything the agent keeps doing on its node whether or not the coordinator
//! is reachable. Its life spans link sessions: while the link is down it keeps the last applied spec
//! enforced (fail-static), retries a failed apply, looks at K3s, lists the node's pods and governs
//! the tenants' cgroups.
//!
//! Work comes in two kinds:
//! - **the spec queue**: specs the coordinator sent, applied one at a time, newest wins, a failed
//!   one retried after [`Periods::apply_retry`];
//! - **periodic jobs** ([`Job`]), each declaring its own period ([`Job::period`], after nomad's
//!   `Periodic()` fingerprinters) and run from one place, the supervisor's loop. A job's next run
//!   is due one period after its last one started, and a job never runs twice at once.
//!
//! Applies and firewall drift checks share one slot: a drift check waits for a running apply, a
//! new spec waits for a running drift check, and a drift check always enforces the newest applied
//! spec. So a drift check can never put an older spec's rules back after a newer apply.
//!
//! The link talks to the supervisor through a [`Node`] handle: it submits specs, asks for a
//! [`CapacityReport`], and receives [`Event`]s (apply results to pass on, and "report now").

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{info, warn};

use hexa_shared::clock::now_unix_ms;
use hexa_shared::k3s::K3sState;
use hexa_shared::report::{CapacityReport, PodInfo, TenantUsage};
use hexa_shared::service::ServiceManager;
use hexa_shared::spec::{AppliedStatus, ApplyOutcome, NodeSpec};

use crate::apply::{Applier, ApplyError};
use crate::collector::Collector;
use crate::isolation::cgroup::{Governor, GovernorSettings, PodTenant};
use crate::pods::{PodSource, PodsError};

/// How often each piece of work comes round; [`Default`] is production's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    /// A spec whose apply failed is tried again after this long.
    pub apply_retry: Duration,
    /// K3s state is looked at this often (it runs `systemctl` and `kubectl`).
    pub k3s: Duration,
    /// The node's pods are listed this often (for the report; the coordinator builds IP sets from them).
    pub pods: Duration,
    /// Tenants' pod cgroups are brought in line with their allocations this often.
    pub govern: Duration,
    /// The firewall is compared with the applied isolation this often, and hand-made drift undone;
    /// also at once whenever the node's pods change (their bridge ports are in the rules).
    pub firewall: Duration,
}

impl Default for Periods {
    fn default() -> Self {
        Periods {
            apply_retry: Duration::from_secs(30),
            k3s: Duration::from_secs(15),
            pods: Duration::from_secs(5),
            govern: Duration::from_secs(10),
            firewall: Duration::from_secs(30),
        }
    }
}

/// The supervisor's periodic jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// Turns the installation, the service and the Node's readiness into the report's [`K3sState`].
    ObserveK3s,
    /// Lists the pods bound to this node.
    ListPods,
    /// Keeps every tenant pod's cgroup within the tenant's allocation; reads per-tenant usage.
    Govern,
    /// Compares the firewall with the applied isolation and undoes drift.
    FirewallDrift,
}

impl Job {
    pub const ALL: [Job; 4] = [Job::ObserveK3s, Job::ListPods, Job::Govern, Job::FirewallDrift];

    /// How long after one run of this job starts the next is due.
    pub fn period(self, periods: &Periods) -> Duration {
        match self {
            Job::ObserveK3s => periods.k3s,
            Job::ListPods => periods.pods,
            Job::Govern => periods.govern,
            Job::FirewallDrift => periods.firewall,
        }
    }

    fn index(self) -> usize {
        match self {
            Job::ObserveK3s => 0,
            Job::ListPods => 1,
            Job::Govern => 2,
            Job::FirewallDrift => 3,
        }
    }
}

/// What the supervisor tells the link.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An apply result the coordinator has to be told.
    Status(AppliedStatus),
    /// Something the report carries changed (applied generation, K3s state, pods): report now
    /// rather than at the next tick.
    Changed,
}

enum Command {
    Spec(Box<NodeSpec>),
    Report(oneshot::Sender<Option<CapacityReport>>),
}

/// The link's handle on the supervisor. Dropping it stops the supervisor (work already started
/// runs to its end).
#[derive(Debug)]
pub struct Node {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    generation: watch::Receiver<u64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Spec(spec) => write!(f, "Spec({})", spec.generation),
            Command::Report(_) => f.write_str("Report"),
        }
    }
}

/// The supervisor has stopped: only a panic in it can do that while its [`Node`] handle lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node supervisor stopped unexpectedly; restart the agent")]
pub struct SupervisorStopped;

impl Node {
    /// Hands `spec` to the supervisor: applied now, or after the apply or drift check running now.
    pub fn submit(&self, spec: NodeSpec) -> Result<(), SupervisorStopped> {
        self.commands.send(Command::Spec(Box::new(spec))).map_err(|_| SupervisorStopped)
    }

    /// The next report, or `None` when the node cannot be sampled: a report of made-up figures
    /// would mislead placement, while a missing one shows up as the node's health.
    pub async fn report(&self) -> Result<Option<CapacityReport>, SupervisorStopped> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Report(reply)).map_err(|_| SupervisorStopped)?;
        answer.await.map_err(|_| SupervisorStopped)
    }

    /// The generation of the spec applied last (0 before any).
    pub fn applied_generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits for the next event.
    pub async fn event(&mut self) -> Result<Event, SupervisorStopped> {
        self.events.recv().await.ok_or(SupervisorStopped)
    }

    /// An event that is already waiting, if any.
    pub fn try_event(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

/// What runs in the one slot that touches the firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Apply,
    DriftCheck,
}

/// A task the supervisor started, to know what a panicked one was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    Apply,
    Job(Job),
}

/// What a finished task brings back.
enum Done {
    Applied { spec: Box<NodeSpec>, result: Result<(), ApplyError> },
    DriftChecked(Result<(), ApplyError>),
    K3s(K3sState),
    Pods(Result<Vec<PodInfo>, PodsError>),
    Governed(Box<Governor>, Vec<TenantUsage>),
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// When the last run started.
    last: Option<Instant>,
    running: bool,
}

/// The node supervisor, started with [`Supervisor::spawn`] and driven through the [`Node`] it returns.
pub struct Supervisor {
    applier: Applier,
    collector: Collector,
    pod_source: Arc<dyn PodSource>,
    cgroup_root: PathBuf,
    governor_settings: GovernorSettings,
    periods: Periods,

    applied: Option<NodeSpec>,
    /// The newest spec that arrived while the firewall slot was busy.
    queued: Option<NodeSpec>,
    /// A spec whose apply failed, and when to try it again.
    retry: Option<(NodeSpec, Instant)>,
    /// The apply or drift check running now.
    work: Option<Work>,

    slots: [Slot; 4],
    tasks: JoinSet<Done>,
    running: HashMap<task::Id, Running>,

    seq: u64,
    k3s_state: K3sState,
    pods: Vec<PodInfo>,
    /// The cgroup governor between runs (it runs on a blocking thread and comes back with the usage it read).
    governor: Option<Box<Governor>>,
    tenant_usage: Vec<TenantUsage>,

    events: mpsc::UnboundedSender<Event>,
    generation: watch::Sender<u64>,
    /// Told READY when a first apply puts isolation in force (if start-up had nothing to
    /// enforce), STATUS at each apply, and WATCHDOG from every pass of the loop.
    service: Arc<ServiceManager>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("applied", &self.applied.as_ref().map(|s| s.generation))
            .field("work", &self.work)
            .field("k3s_state", &self.k3s_state)
            .finish_non_exhaustive()
    }
}

/// What the supervisor works with on this node.
#[derive(Debug)]
pub struct NodeParts {
    pub applier: Applier,
    pub collector: Collector,
    pub pod_source: Arc<dyn PodSource>,
    /// Root of the cgroup hierarchy the governor works under (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    pub governor: GovernorSettings,
}

impl Supervisor {
    /// A supervisor that starts by applying `applied` again (the last applied spec, fail-static).
    fn new(
        parts: NodeParts,
        applied: Option<NodeSpec>,
        periods: Periods,
        service: Arc<ServiceManager>,
    ) -> (Supervisor, mpsc::UnboundedReceiver<Event>, watch::Receiver<u64>) {
        let NodeParts { applier, collector, pod_source, cgroup_root, governor: governor_settings } = parts;
        let (events, events_rx) = mpsc::unbounded_channel();
        let (generation, generation_rx) = watch::channel(applied.as_ref().map_or(0, |s| s.generation));
        let mut slots = [Slot::default(); 4];
        // The first drift check comes one period after start: start-up has just enforced the spec.
        slots[Job::FirewallDrift.index()].last = Some(Instant::now());
        let supervisor = Supervisor {
            applier,
            collector,
            pod_source,
            cgroup_root,
            governor_settings,
            periods,
            applied,
            queued: None,
            retry: None,
            work: None,
            slots,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            seq: 0,
            k3s_state: K3sState::NotInstalled,
            pods: Vec::new(),
            governor: None,
            tenant_usage: Vec::new(),
            events,
            generation,
            service,
        };
        (supervisor, events_rx, generation_rx)
    }

    /// Starts the supervisor on the current runtime; it runs until the returned handle is dropped.
    /// It tells `service` what it does (`ServiceManager::none()` outside systemd). The supervisor's
    /// loop is the one whose hang would leave the node's isolation unattended, so the watchdog is
    /// fed from it: a pass that never ends (a blocked read of the node's state, a stalled runtime)
    /// stops the pings and systemd restarts the agent.
    pub fn spawn(parts: NodeParts, applied: Option<NodeSpec>, periods: Periods, service: Arc<ServiceManager>) -> Node {
        let (supervisor, events, generation) = Supervisor::new(parts, applied, periods, service);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(supervisor.run(commands_rx));
        Node { commands, events, generation }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // Fail-static: the last applied spec is enforced again at once, coordinator or not.
        if let Some(spec) = self.applied.clone() {
            self.start_apply(spec);
        }
        loop {
            self.service.ping();
            self.start_due();
            let ping = self.service.next_ping().map(Instant::from_std);
            let wake = match (self.next_wake(), ping) {
                (Some(job), Some(ping)) => Some(job.min(ping)),
                (job, ping) => job.or(ping),
            };
            tokio::select! {
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Spec(spec)) => self.accept_spec(*spec),
                    Some(Command::Report(reply)) => {
                        let _ = reply.send(self.report());
                    }
                },
                Some(done) = self.tasks.join_next_with_id() => self.finished(done),
                _ = sleep_until(wake) => {}
            }
        }
        // What is under way finishes on its own, as a restart-safe apply may be in the middle of a step.
        self.tasks.detach_all();
    }

    fn emit(&self, event: Event) {
        // The link holds the receiver for the agent's whole life; a send can only fail at shutdown.
        let _ = self.events.send(event);
    }

    /// Takes a spec from the coordinator: applied now, or after the work running now.
    fn accept_spec(&mut self, spec: NodeSpec) {
        let generation = spec.generation;
        if self.applied.as_ref().is_some_and(|current| current.generation > generation) {
            warn!(generation, "ignoring a spec older than the one applied");
            self.emit(Event::Status(AppliedStatus {
                generation,
                outcome: ApplyOutcome::Failed { reason: "older than the applied generation".into() },
            }));
            return;
        }
        self.retry = None;
        if self.work.is_some() {
            self.queued = Some(spec);
        } else {
            self.start_apply(spec);
        }
    }

    fn start_apply(&mut self, spec: NodeSpec) {
        let applier = self.applier.clone();
        info!(generation = spec.generation, "applying spec");
        if spec.k3s.is_some() {
            self.k3s_state = K3sState::Installing;
        }
        self.work = Some(Work::Apply);
        let handle = self.tasks.spawn(async move {
            let result = applier.apply(&spec).await;
            Done::Applied { spec: Box::new(spec), result }
        });
        self.running.insert(handle.id(), Running::Apply);
    }

    /// Whether `job` has to wait for something other than time before it can run.
    fn blocked(&self, job: Job) -> bool {
        match job {
            // Never beside an apply or another drift check (see the module docs).
            Job::FirewallDrift => self.work.is_some(),
            // K3s is being changed; it is looked at once the apply is done.
            Job::ObserveK3s => self.work == Some(Work::Apply),
            // Nothing to govern on a node without tenants' pods (those of a tenant with no
            // allocation here are held to the unknown-tenant default).
            Job::Govern => {
                self.applied.as_ref().is_none_or(|s| s.tenants.is_empty())
                    && self.pods.iter().all(|p| p.tenant.is_none())
            }
            Job::ListPods => false,
        }
    }

    fn due(&self, job: Job, now: Instant) -> bool {
        let slot = self.slots[job.index()];
        !slot.running && slot.last.is_none_or(|last| now.duration_since(last) >= job.period(&self.periods))
    }

    /// When the loop has to look again even if nothing happens: the next job or retry that only
    /// waits for time. Jobs that wait for something else are looked at after every event.
    fn next_wake(&self) -> Option<Instant> {
        let jobs =
            Job::ALL.into_iter().filter(|&job| !self.slots[job.index()].running && !self.blocked(job)).map(|job| {
                let last = self.slots[job.index()].last;
                last.map_or_else(Instant::now, |last| last + job.period(&self.periods))
            });
        let retry = self.retry.as_ref().filter(|_| self.work.is_none()).map(|(_, at)| *at);
        jobs.chain(retry).min()
    }

    /// Starts what is due: a queued or retried apply, then each periodic job whose time has come.
    fn start_due(&mut self) {
        let now = Instant::now();
        if self.work.is_none() {
            if let Some(spec) = self.queued.take() {
                self.start_apply(spec);
            } else if let Some((spec, _)) = self.retry.take_if(|(_, at)| *at <= now) {
                self.start_apply(spec);
            }
        }
        for job in Job::ALL {
            if self.due(job, now) && !self.blocked(job) {
                self.start(job, now);
            }
        }
    }

    fn node_name(&self) -> String {
        self.applied.as_ref().map(|s| s.node_name.clone()).unwrap_or_default()
    }

    fn start(&mut self, job: Job, now: Instant) {
        self.slots[job.index()].last = Some(now);
        let handle = match job {
            Job::FirewallDrift => {
                // Always the newest applied spec: nothing can be applied while this runs.
                let Some(spec) = self.applied.clone().filter(|s| s.isolation.is_some()) else { return };
                let applier = self.applier.clone();
                self.work = Some(Work::DriftCheck);
                self.tasks.spawn(async move { Done::DriftChecked(applier.enforce_isolation(&spec).await) })
            }
            Job::ListPods => {
                let source = self.pod_source.clone();
                let node = self.node_name();
                self.tasks.spawn(async move { Done::Pods(source.pods(&node).await) })
            }
            Job::ObserveK3s => {
                let applier = self.applier.clone();
                let node = self.node_name();
                self.tasks.spawn(async move { Done::K3s(applier.k3s_state(&node).await) })
            }
            Job::Govern => {
                let Some(mut governor) = self.governor.take().or_else(|| self.open_governor()) else { return };
                let allocations = self.applied.as_ref().map(|s| s.tenants.clone()).unwrap_or_default();
                let pods: Vec<PodTenant> = self
                    .pods
                    .iter()
                    .filter_map(|p| p.tenant.clone().map(|tenant| PodTenant { pod_uid: p.uid.clone(), tenant }))
                    .collect();
                let figures = self.applier.figures.clone();
                self.tasks.spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    let usage = match governor.reconcile(&allocations, &pods, started) {
                        Ok(done) => {
                            figures.cgroup_passed(started.elapsed(), done.writes.len());
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
                    Done::Governed(governor, usage)
                })
            }
        };
        self.slots[job.index()].running = true;
        self.running.insert(handle.id(), Running::Job(job));
    }

    fn open_governor(&self) -> Option<Box<Governor>> {
        match Governor::open(&self.cgroup_root, self.governor_settings.clone()) {
            Ok(governor) => Some(Box::new(governor)),
            Err(e) => {
                warn!(root = %self.cgroup_root.display(), error = %e, "cannot open the cgroup hierarchy; tenants are not governed");
                None
            }
        }
    }

    fn finished(&mut self, done: Result<(task::Id, Done), JoinError>) {
        let (id, done) = match done {
            Ok((id, done)) => (id, Ok(done)),
            Err(e) => (e.id(), Err(e)),
        };
        let running = self.running.remove(&id);
        match running {
            Some(Running::Apply) => self.work = None,
            Some(Running::Job(job)) => {
                self.slots[job.index()].running = false;
                if job == Job::FirewallDrift {
                    self.work = None;
                }
            }
            None => {}
        }
        match (done, running) {
            (Ok(Done::Applied { spec, result }), _) => self.apply_finished(*spec, result),
            (Ok(Done::DriftChecked(result)), _) => {
                if let Err(e) = result {
                    warn!(error = %e, "firewall drift check failed");
                }
            }
            (Ok(Done::K3s(state)), _) => self.k3s_observed(state),
            (Ok(Done::Pods(Ok(pods))), _) => {
                // A change in the node's pods is news for the coordinator's IP sets, and for the
                // firewall here: a new pod's traffic is dropped until its bridge port is known.
                if pods != self.pods {
                    self.pods = pods;
                    self.emit(Event::Changed);
                    self.slots[Job::FirewallDrift.index()].last = None;
                }
            }
            (Ok(Done::Pods(Err(e))), _) => warn!(error = %e, "cannot list this node's pods; reporting the last list"),
            (Ok(Done::Governed(governor, usage)), _) => {
                self.governor = Some(governor);
                self.tenant_usage = usage;
            }
            (Err(e), Some(Running::Apply)) => {
                self.emit(Event::Status(AppliedStatus {
                    generation: 0,
                    outcome: ApplyOutcome::Failed { reason: format!("apply task failed: {e}") },
                }));
                self.emit(Event::Changed);
            }
            (Err(e), Some(Running::Job(Job::ObserveK3s))) => {
                self.k3s_observed(K3sState::Failed { reason: format!("observing k3s failed: {e}") })
            }
            (Err(e), Some(Running::Job(Job::ListPods))) => warn!(error = %e, "pod listing task failed"),
            (Err(e), Some(Running::Job(Job::Govern))) => {
                warn!(error = %e, "cgroup governor task failed; starting it afresh")
            }
            (Err(e), Some(Running::Job(Job::FirewallDrift))) => warn!(error = %e, "firewall drift check failed"),
            (Err(e), None) => warn!(error = %e, "a supervisor task failed"),
        }
    }

    fn k3s_observed(&mut self, state: K3sState) {
        if state != self.k3s_state {
            self.k3s_state = state;
            self.emit(Event::Changed);
        }
    }

    fn apply_finished(&mut self, spec: NodeSpec, result: Result<(), ApplyError>) {
        let generation = spec.generation;
        let outcome = match result {
            Ok(()) => {
                info!(generation, "spec applied");
                let what = if spec.isolation.is_some() { "isolation" } else { "spec" };
                // The first apply is what makes a node with nothing on disk ready.
                self.service.ready(&format!("{what} of generation {generation} in force"));
                self.applied = Some(spec);
                self.generation.send_replace(generation);
                ApplyOutcome::Applied
            }
            Err(e) => {
                let reason = e.to_string();
                warn!(generation, %reason, retry_in_s = self.periods.apply_retry.as_secs(), "cannot apply spec");
                self.service.status(&format!(
                    "cannot apply generation {generation}: {reason}; retrying in {}s",
                    self.periods.apply_retry.as_secs()
                ));
                if self.queued.is_none() {
                    self.retry = Some((spec, Instant::now() + self.periods.apply_retry));
                }
                ApplyOutcome::Failed { reason }
            }
        };
        self.emit(Event::Status(AppliedStatus { generation, outcome }));
        // The applied generation changed: report at once rather than at the next tick.
        self.emit(Event::Changed);
        // Look at K3s again now that it may have changed.
        self.slots[Job::ObserveK3s.index()].last = None;
    }

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
            node_name: self.node_name(),
            collected_at_unix_ms: now_unix_ms(),
            capacity: sample.capacity,
            allocatable: sample.allocatable,
            usage: sample.usage,
            cgroup_limits: sample.cgroup_limits,
            applied_generation: self.applied.as_ref().map_or(0, |s| s.generation),
            k3s: self.k3s_state.clone(),
            pods: self.pods.clone(),
            tenant_usage: self.tenant_usage.clone(),
            firewall_displacements: self.applier.displacements.load(std::sync::atomic::Ordering::Relaxed),
            isolation: self.applier.figures.figures(),
        })
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc as std_mpsc;

    use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
    use hexa_shared::names::Pool;
    use hexa_shared::report::Resources;

    use super::*;
    use crate::collector::CollectorSettings;
    use crate::isolation::firewall::{Batch, Firewall, FirewallError, LocalPods, MemoryFirewall, Ruleset};
    use crate::k3s::{self, RecordingSystemd, ScriptedReadiness};
    use crate::pods::StaticPodSource;
    use crate::state::StateDir;

    /// A memory firewall whose next batch, once armed, waits until the test lets it through, and
    /// that can be told to refuse its next batch.
    #[derive(Debug, Default)]
    struct Gated {
        inner: MemoryFirewall,
        gate: Mutex<Option<(oneshot::Sender<()>, std_mpsc::Receiver<()>)>>,
        refuse_next: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        /// Holds the next batch; the receiver hears when it is being held, the sender lets it go.
        fn arm(&self) -> (oneshot::Receiver<()>, std_mpsc::Sender<()>) {
            let (entered_tx, entered) = oneshot::channel();
            let (release, release_rx) = std_mpsc::channel();
            *self.gate.lock().unwrap() = Some((entered_tx, release_rx));
            (entered, release)
        }
    }

    impl Firewall for Gated {
        fn current(&self) -> Result<Ruleset, FirewallError> {
            self.inner.current()
        }

        fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
            if self.refuse_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(FirewallError::Command {
                    command: "iptables-restore --noflush".into(),
                    status: "exit status: 4".into(),
                    stderr: "Another app is currently holding the xtables lock".into(),
                    detail: String::new(),
                });
            }
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, release)) = gate {
                let _ = entered.send(());
                let _ = release.recv();
            }
            self.inner.apply(batch)
        }

        fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError> {
            self.inner.ensure_bridge_filtering()
        }
    }

    fn isolation(tenants: &[(&str, &str)]) -> IsolationSpec {
        IsolationSpec {
            pod_cidr: "10.42.0.0/16".parse().unwrap(),
            management_cidrs: vec!["192.168.100.10".parse().unwrap()],
            system_pod_ips: ["10.42.0.53".parse().unwrap()].into(),
            tenants: tenants
                .iter()
                .map(|(tenant, ip)| TenantIsolation {
                    tenant: tenant.to_string(),
                    pod_ips: [ip.parse().unwrap()].into(),
                })
                .collect(),
            node_addresses: Default::default(),
            node_services: Vec::new(),
        }
    }

    fn spec(generation: u64, isolation: IsolationSpec) -> NodeSpec {
        NodeSpec { isolation: Some(isolation), ..NodeSpec::for_pool("n1", &Pool::Shared, generation) }
    }

    fn supervisor(dir: &std::path::Path, firewall: Arc<Gated>, periods: Periods) -> Node {
        hexa_shared::install_crypto_provider();
        let state = StateDir::open(&dir.join("state")).unwrap();
        let applier = Applier {
            state,
            root: dir.join("root"),
            systemd: Arc::new(RecordingSystemd::new()),
            readiness: Arc::new(ScriptedReadiness::new([Ok(false)])),
            fetcher: Arc::new(k3s::Fetcher::new(k3s::Arch::of_this_machine().unwrap(), Default::default()).unwrap()),
            firewall,
            local_pods: Arc::new(crate::isolation::local_pods::CniResults::new(dir.join("cni"), "cni0")),
            displacements: Default::default(),
            figures: Default::default(),
        };
        let collector = Collector::new(CollectorSettings {
            proc_root: "/proc".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            ephemeral_path: "/".into(),
            reserved: Resources::default(),
            eviction_memory_bytes: 0,
            max_pods: 110,
        });
        let pods = Arc::new(StaticPodSource::default());
        let parts = NodeParts {
            applier,
            collector,
            pod_source: pods,
            cgroup_root: dir.join("cgroup"),
            governor: Default::default(),
        };
        Supervisor::spawn(parts, None, periods, ServiceManager::none())
    }

    async fn status(node: &mut Node) -> AppliedStatus {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), node.event()).await {
                Ok(Ok(Event::Status(status))) => return status,
                Ok(Ok(Event::Changed)) => {}
                other => panic!("no apply status: {other:?}"),
            }
        }
    }

    /// A drift check that is correcting the firewall to the applied spec when a newer spec arrives
    /// must finish before the newer spec is applied, and never put the older rules back after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drift_check_never_puts_an_older_spec_back() {
        let dir = tempfile::tempdir().unwrap();
        let firewall = Arc::new(Gated::default());
        let periods = Periods { firewall: Duration::from_millis(20), ..Periods::default() };
        let mut node = supervisor(dir.path(), firewall.clone(), periods);

        let old = spec(1, isolation(&[("acme", "10.42.0.11")]));
        node.submit(old.clone()).unwrap();
        assert_eq!(status(&mut node).await, AppliedStatus { generation: 1, outcome: ApplyOutcome::Applied });

        // Hand-made drift; the next drift check is held while it writes its repair batch.
        let (entered, release) = firewall.arm();
        firewall.inner.exec_ipset("add hx-sys 10.42.9.9\n").unwrap();
        tokio::time::timeout(Duration::from_secs(10), entered).await.unwrap().unwrap();

        // A newer spec arrives while the drift check (for generation 1) is in the middle of its write.
        let new = spec(2, isolation(&[("acme", "10.42.0.11"), ("globex", "10.42.0.12")]));
        node.submit(new.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Some(event) = node.try_event() {
            assert!(!matches!(event, Event::Status(_)), "applied beside a running drift check: {event:?}");
        }

        release.send(()).unwrap();
        assert_eq!(status(&mut node).await, AppliedStatus { generation: 2, outcome: ApplyOutcome::Applied });
        let want = Ruleset::desired(new.isolation.as_ref().unwrap(), &LocalPods::default()).unwrap();
        assert_eq!(firewall.current().unwrap(), want, "the newer spec's rules are in force");
        // Later drift checks enforce the newest applied spec.
        firewall.inner.exec_ipset("add hx-sys 10.42.9.9\n").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(firewall.current().unwrap(), want, "drift undone towards the newer spec");
        assert_eq!(node.applied_generation(), 2);
    }

    /// With no link at all, a spec whose apply failed is retried and then enforced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_apply_is_retried_without_a_coordinator() {
        let dir = tempfile::tempdir().unwrap();
        let firewall = Arc::new(Gated::default());
        firewall.refuse_next.store(true, std::sync::atomic::Ordering::SeqCst);
        let periods = Periods { apply_retry: Duration::from_millis(50), ..Periods::default() };
        let mut node = supervisor(dir.path(), firewall.clone(), periods);
        let wanted = spec(1, isolation(&[("acme", "10.42.0.11")]));
        node.submit(wanted.clone()).unwrap();

        let failed = status(&mut node).await;
        assert_eq!(failed.generation, 1);
        assert!(
            matches!(&failed.outcome, ApplyOutcome::Failed { reason } if reason.contains("xtables lock")),
            "{failed:?}"
        );
        assert_eq!(node.applied_generation(), 0);
        assert_eq!(status(&mut node).await, AppliedStatus { generation: 1, outcome: ApplyOutcome::Applied });
        assert_eq!(
            firewall.current().unwrap(),
            Ruleset::desired(wanted.isolation.as_ref().unwrap(), &LocalPods::default()).unwrap()
        );
        assert_eq!(node.applied_generation(), 1);
    }

    #[tokio::test]
    async fn an_older_spec_is_refused_and_reports_carry_the_applied_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut node = supervisor(dir.path(), Arc::new(Gated::default()), Periods::default());
        node.submit(spec(3, isolation(&[]))).unwrap();
        assert_eq!(status(&mut node).await.outcome, ApplyOutcome::Applied);
        node.submit(spec(2, isolation(&[]))).unwrap();
        let refused = status(&mut node).await;
        assert_eq!(refused.generation, 2);
        assert!(matches!(refused.outcome, ApplyOutcome::Failed { .. }), "{refused:?}");
        let report = node.report().await.unwrap().unwrap();
        assert_eq!((report.applied_generation, report.node_name.as_str()), (3, "n1"));
        let next = node.report().await.unwrap().unwrap();
        assert_eq!(next.seq, report.seq + 1);
    }

    #[test]
    fn every_job_declares_its_period() {
        let periods = Periods::default();
        let declared: Vec<_> = Job::ALL.iter().map(|job| job.period(&periods)).collect();
        assert_eq!(
            declared,
            [Duration::from_secs(15), Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(30)]
        );
    }
}
