//! A fleet of simulated agents in one process: `hexa-sim`, the ingest benchmark and the tests that
//! need many nodes.
//!
//! Every simulated agent is a real QUIC connection with a certificate of its own, enrolled with a
//! token of its own. What goes over the wire is the agent's: enrollment is
//! [`hexa_agent::enroll::request_certificate`], a session opens with [`hexa_agent::link::open_session`]
//! and the agent's [`hello`](hexa_agent::link::hello), the link is presumed dead after the agent's
//! [`silence_limit`](hexa_agent::link::silence_limit), and reconnects wait the agent's jittered
//! [`backoff_delay`](hexa_agent::backoff::backoff_delay). Only what a node would report is made up:
//! capacity, drifting usage, and pods that come and go.
//!
//! Agents share a few client endpoints (one UDP socket each, on its own loopback address, as nodes
//! behind one switch would): each connection presents its own certificate through
//! `connect_with`. A partition that drops packets drops them on an endpoint, so it cuts every agent
//! behind it.
//!
//! Control: [`Fleet::kill`] ends an agent at once, mid-session, as `kill -9` ends a process: not a
//! frame more, no stream finished, no connection closed. Its connection is left open and unused
//! until the coordinator gives up on it, so the coordinator finds out by silence alone, as it would
//! from a dead process (whose kernel says nothing over UDP either); [`Fleet::revive`] starts it again with its credentials and the generation it
//! applied, as a restarted agent with its state directory; [`Fleet::partition`] and
//! [`Fleet::heal`] cut and restore its network.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use hexa_agent::backoff::backoff_delay;
use hexa_agent::enroll::{NodeFacts, request_certificate};
use hexa_agent::link::{OpenError, Session, hello, open_session, report_interval, silence_limit};
use hexa_shared::k3s::K3sState;
use hexa_shared::pki::{self, CaHash};
use hexa_shared::proto::{AgentMessage, CoordinatorMessage, Enrolled, ProviderIdentity, SystemInfo, close_code};
use hexa_shared::report::{CapacityReport, PodInfo, Pressure, PressureAverages, Resources, TenantUsage, Usage};
use hexa_shared::spec::{AppliedStatus, ApplyOutcome};
use hexa_shared::wire;

/// How a fleet is made.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The coordinator's QUIC address.
    pub coordinator: SocketAddr,
    /// The CA pin enrollment checks.
    pub ca_hash: CaHash,
    /// Client endpoints the agents share (at least one). Endpoint `i` is bound to its own loopback
    /// address, `127.1.<i / 250>.<i % 250 + 1>`, so that the coordinator sees as many peers'
    /// addresses as there are endpoints.
    pub endpoints: usize,
    /// Pods each agent reports.
    pub pods_per_agent: usize,
    /// Name prefix: agents are `<prefix>-00000`, `<prefix>-00001`, ...
    pub prefix: String,
    /// Seeds the figures each agent reports.
    pub seed: u64,
}

impl FleetConfig {
    pub fn new(coordinator: SocketAddr, ca_hash: CaHash) -> FleetConfig {
        FleetConfig { coordinator, ca_hash, endpoints: 4, pods_per_agent: 8, prefix: "sim".into(), seed: 1 }
    }
}

/// What a simulated agent's network or process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// Nothing leaves the agent (its sends are blocked); it notices the silence and retries in vain.
    Silent,
    /// The process is gone.
    Killed,
}

/// How [`Fleet::partition`] cuts an agent off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// The agent stops sending (its outbound traffic is blocked; its connection stays open and
    /// QUIC still answers underneath). It notices that acknowledgements stop and tries to
    /// reconnect, in vain, until healed.
    StopSending,
    /// Every packet to and from the agent's endpoint is dropped, so every agent sharing that
    /// endpoint is cut off too (nodes behind one switch).
    DropPackets,
}

/// Counters and samples of the whole fleet.
#[derive(Debug, Default)]
pub struct Stats {
    pub reports_sent: AtomicU64,
    pub reports_acked: AtomicU64,
    pub specs_received: AtomicU64,
    pub specs_applied: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub session_failures: AtomicU64,
    /// Report sent to its ReportAck, in microseconds, since the last [`Stats::take_latencies`].
    latencies_us: Mutex<Vec<u32>>,
}

impl Stats {
    /// The report latencies sampled since the last call, sorted.
    pub fn take_latencies(&self) -> Vec<u32> {
        let mut samples = std::mem::take(&mut *self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
        samples.sort_unstable();
        samples
    }

    fn latency(&self, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push(us);
    }
}

/// An enrolled node's credentials, kept in memory.
#[derive(Debug)]
pub struct Credentials {
    pub name: String,
    key_der: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    ca: CertificateDer<'static>,
}

impl Credentials {
    fn new(key: &KeyPair, enrolled: Enrolled) -> Credentials {
        Credentials {
            name: enrolled.node_name,
            key_der: key.serialize_der(),
            chain: enrolled.cert_chain_der.into_iter().map(CertificateDer::from).collect(),
            ca: CertificateDer::from(enrolled.ca_der),
        }
    }

    fn link_config(&self) -> Result<quinn::ClientConfig, pki::PkiError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        pki::link_client_config(&self.ca, self.chain.clone(), key)
    }
}

/// One simulated agent's state, shared between its task and the fleet.
#[derive(Debug)]
struct AgentState {
    index: usize,
    creds: Credentials,
    endpoint: usize,
    mode: watch::Sender<Mode>,
    /// Up: welcomed, and the session not yet over.
    linked: AtomicBool,
    /// When the current session was welcomed, in nanoseconds since the fleet's epoch (0: never).
    welcomed_at_ns: AtomicU64,
    /// The generation of the last spec applied; survives kills, as the agent's state dir does.
    applied_generation: AtomicU64,
    /// Set when the coordinator refused the agent for good (superseded, revoked).
    refused: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Shared {
    coordinator: Mutex<SocketAddr>,
    endpoints: Vec<quinn::Endpoint>,
    cut: Vec<Arc<AtomicBool>>,
    stats: Arc<Stats>,
    epoch: Instant,
    pods_per_agent: usize,
    seed: u64,
}

/// The simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    shared: Arc<Shared>,
    agents: Vec<Arc<AgentState>>,
    tasks: Mutex<Vec<Option<JoinHandle<()>>>>,
    prefix: String,
    ca_hash: CaHash,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind a client endpoint on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("enrollment of {name} failed: {error}")]
    Enroll { name: String, error: String },
}

fn endpoint_addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)), 0)
}

impl Fleet {
    /// Binds the fleet's endpoints; no agent exists until [`Fleet::enroll`].
    pub fn new(config: &FleetConfig) -> Result<Fleet, SimError> {
        let mut endpoints = Vec::new();
        let mut cut = Vec::new();
        for i in 0..config.endpoints.max(1) {
            let addr = endpoint_addr(i);
            let bind = |error| SimError::Bind { addr, error };
            let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
            let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
            let flag = Arc::new(AtomicBool::new(false));
            let socket =
                Arc::new(Cuttable { inner: runtime.wrap_udp_socket(socket).map_err(bind)?, cut: flag.clone() });
            let endpoint =
                quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), None, socket, runtime)
                    .map_err(bind)?;
            endpoints.push(endpoint);
            cut.push(flag);
        }
        Ok(Fleet {
            shared: Arc::new(Shared {
                coordinator: Mutex::new(config.coordinator),
                endpoints,
                cut,
                stats: Arc::default(),
                epoch: Instant::now(),
                pods_per_agent: config.pods_per_agent,
                seed: config.seed,
            }),
            agents: Vec::new(),
            tasks: Mutex::new(Vec::new()),
            prefix: config.prefix.clone(),
            ca_hash: config.ca_hash,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The name the coordinator gave agent `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.agents[i].creds.name
    }

    pub fn names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.creds.name.clone()).collect()
    }

    /// The agents sharing agent `i`'s endpoint (itself included).
    pub fn behind_same_endpoint(&self, i: usize) -> Vec<usize> {
        let endpoint = self.agents[i].endpoint;
        self.agents.iter().filter(|a| a.endpoint == endpoint).map(|a| a.index).collect()
    }

    /// Points every later connection at `addr` (sessions open now keep their coordinator).
    pub fn retarget(&self, addr: SocketAddr) {
        *self.shared.coordinator.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Enrolls one new agent per token, `concurrency` at a time, through the agent's enrollment.
    /// A failure that retrying can fix (no answer, refused before the handshake under load) is
    /// retried with the agent's backoff; a refusal ends the enrollment with an error. The agents
    /// do not run until [`Fleet::start`].
    pub async fn enroll(&mut self, tokens: Vec<String>, concurrency: usize) -> Result<(), SimError> {
        let first = self.agents.len();
        let addr = *self.shared.coordinator.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = tokens.into_iter().enumerate();
        let mut running = tokio::task::JoinSet::new();
        let mut enrolled = Vec::new();
        loop {
            while running.len() < concurrency.max(1) {
                let Some((k, token)) = pending.next() else { break };
                let index = first + k;
                let endpoint_index = index % self.shared.endpoints.len();
                let endpoint = self.shared.endpoints[endpoint_index].clone();
                let name = format!("{}-{index:05}", self.prefix);
                running.spawn(enroll_one(endpoint, addr, self.ca_hash, token, name, index, endpoint_index));
            }
            match running.join_next().await {
                Some(Ok(result)) => enrolled.push(result?),
                Some(Err(e)) => return Err(SimError::Enroll { name: "?".into(), error: e.to_string() }),
                None => break,
            }
        }
        enrolled.sort_by_key(|(i, _, _)| *i);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (index, endpoint, creds) in enrolled {
            self.agents.push(Arc::new(AgentState {
                index,
                creds,
                endpoint,
                mode: watch::Sender::new(Mode::Killed),
                linked: AtomicBool::new(false),
                welcomed_at_ns: AtomicU64::new(0),
                applied_generation: AtomicU64::new(0),
                refused: Mutex::new(None),
            }));
            tasks.push(None);
        }
        Ok(())
    }

    /// Starts every agent that is not running.
    pub fn start_all(&self) {
        for i in 0..self.agents.len() {
            self.revive(i);
        }
    }

    /// Starts agent `i` (again), unless it runs: a restarted agent with its state directory.
    pub fn revive(&self, i: usize) {
        let agent = &self.agents[i];
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks[i].as_ref().is_some_and(|t| !t.is_finished()) && *agent.mode.borrow() != Mode::Killed {
            return;
        }
        if let Some(old) = tasks[i].take() {
            old.abort();
        }
        agent.mode.send_replace(Mode::Running);
        tasks[i] = Some(tokio::spawn(run_agent(self.shared.clone(), agent.clone())));
    }

    /// Ends agent `i` at once, saying nothing to the coordinator (see the module's notes). The
    /// agent's task sees the change and leaves its connection behind untouched.
    pub fn kill(&self, i: usize) {
        let agent = &self.agents[i];
        agent.mode.send_replace(Mode::Killed);
        agent.linked.store(false, Ordering::Relaxed);
    }

    pub fn kill_all(&self) {
        for i in 0..self.agents.len() {
            self.kill(i);
        }
    }

    /// Cuts agent `i` off the network (see [`Partition`]).
    pub fn partition(&self, i: usize, how: Partition) {
        match how {
            Partition::StopSending => {
                self.agents[i].mode.send_if_modified(|mode| {
                    let running = *mode == Mode::Running;
                    if running {
                        *mode = Mode::Silent;
                    }
                    running
                });
            }
            Partition::DropPackets => self.shared.cut[self.agents[i].endpoint].store(true, Ordering::Relaxed),
        }
    }

    /// Undoes every partition of agent `i` (a dropping endpoint is healed for all behind it).
    pub fn heal(&self, i: usize) {
        self.shared.cut[self.agents[i].endpoint].store(false, Ordering::Relaxed);
        self.agents[i].mode.send_if_modified(|mode| {
            let silent = *mode == Mode::Silent;
            if silent {
                *mode = Mode::Running;
            }
            silent
        });
    }

    /// Whether agent `i` has a session the coordinator welcomed.
    pub fn is_linked(&self, i: usize) -> bool {
        self.agents[i].linked.load(Ordering::Relaxed)
    }

    pub fn linked_count(&self) -> usize {
        self.agents.iter().filter(|a| a.linked.load(Ordering::Relaxed)).count()
    }

    /// How many agents have been welcomed (and are still linked) since `since`.
    pub fn linked_since(&self, since: Instant) -> usize {
        let since_ns = since.saturating_duration_since(self.shared.epoch).as_nanos() as u64;
        self.agents
            .iter()
            .filter(|a| a.linked.load(Ordering::Relaxed) && a.welcomed_at_ns.load(Ordering::Relaxed) > since_ns)
            .count()
    }

    /// When each agent's current session was welcomed, after `since` (agents not linked since are
    /// left out), sorted.
    pub fn welcome_times_since(&self, since: Instant) -> Vec<Duration> {
        let since_ns = since.saturating_duration_since(self.shared.epoch).as_nanos() as u64;
        let mut times: Vec<Duration> = self
            .agents
            .iter()
            .map(|a| a.welcomed_at_ns.load(Ordering::Relaxed))
            .filter(|at| *at > since_ns)
            .map(|at| Duration::from_nanos(at - since_ns))
            .collect();
        times.sort();
        times
    }

    /// The generation agent `i` last applied.
    pub fn applied_generation(&self, i: usize) -> u64 {
        self.agents[i].applied_generation.load(Ordering::Relaxed)
    }

    /// Why the coordinator turned agent `i` away for good, if it did.
    pub fn refusal(&self, i: usize) -> Option<String> {
        self.agents[i].refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Kills every agent and closes the endpoints.
    pub async fn shutdown(&self) {
        self.kill_all();
        for endpoint in &self.shared.endpoints {
            endpoint.close(close_code::DONE.into(), b"simulation over");
        }
        for endpoint in &self.shared.endpoints {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).iter_mut().flatten() {
            task.abort();
        }
    }
}

/// Enrolls one agent, retrying what retrying can fix with the agent's backoff.
async fn enroll_one(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    pin: CaHash,
    token: String,
    name: String,
    index: usize,
    endpoint_index: usize,
) -> Result<(usize, usize, Credentials), SimError> {
    let facts = NodeFacts {
        hostname: format!("{name}.sim"),
        machine_id: format!("{:032x}", index as u128 + 1),
        requested_name: Some(name.clone()),
        provider: ProviderIdentity::None,
    };
    let mut attempt = 0;
    loop {
        match request_certificate(&endpoint, addr, &token, pin, &facts).await {
            Ok((key, enrolled)) => return Ok((index, endpoint_index, Credentials::new(&key, enrolled))),
            Err(e @ hexa_agent::AgentError::Refused(_)) => return Err(SimError::Enroll { name, error: e.to_string() }),
            Err(e) if attempt >= 20 => return Err(SimError::Enroll { name, error: e.to_string() }),
            Err(_) => {
                let delay = backoff_delay(attempt, rand::rng().random::<f64>());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// How a session ended.
enum End {
    /// Was up; reconnect promptly (attempt 0).
    Dropped,
    /// Never came up; back off further.
    Failed,
    /// Refused for good.
    Refused(String),
    /// Killed: the agent is gone until revived.
    Killed,
}

/// Resolves once the agent is killed.
async fn killed(mode: &mut watch::Receiver<Mode>) {
    // An error means the fleet is gone, which ends the agent too.
    let _ = mode.wait_for(|m| *m == Mode::Killed).await;
}

/// One agent's life: sessions with jittered backoff between them, as the agent's `Link::run`.
async fn run_agent(shared: Arc<Shared>, me: Arc<AgentState>) {
    let mut mode = me.mode.subscribe();
    let mut rng = StdRng::seed_from_u64(shared.seed ^ (me.index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut figures = Figures::new(&mut rng, me.index, shared.pods_per_agent);
    let mut attempt = 0u32;
    loop {
        let end = session(&shared, &me, &mut mode, &mut figures, &mut rng).await;
        me.linked.store(false, Ordering::Relaxed);
        match end {
            End::Dropped => attempt = 0,
            End::Failed => {
                shared.stats.session_failures.fetch_add(1, Ordering::Relaxed);
            }
            End::Refused(reason) => {
                *me.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                return;
            }
            End::Killed => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff_delay(attempt, rng.random::<f64>())) => {}
            _ = killed(&mut mode) => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

async fn session(
    shared: &Shared,
    me: &AgentState,
    mode: &mut watch::Receiver<Mode>,
    figures: &mut Figures,
    rng: &mut StdRng,
) -> End {
    if *mode.borrow_and_update() == Mode::Silent {
        // Blocked outbound: the attempt goes nowhere.
        return End::Failed;
    }
    let Ok(config) = me.creds.link_config() else { return End::Refused("credentials unusable".into()) };
    let addr = *shared.coordinator.lock().unwrap_or_else(|p| p.into_inner());
    let system = SystemInfo {
        hostname: format!("{}.sim", me.creds.name),
        os: "Debian GNU/Linux 13 (trixie)".into(),
        kernel: "6.12.48+deb13-amd64".into(),
        arch: "x86_64".into(),
    };
    let hello = hello(&me.creds.name, me.applied_generation.load(Ordering::Relaxed), system);
    let endpoint = &shared.endpoints[me.endpoint];
    let opened = tokio::select! {
        opened = open_session(endpoint, addr, config, &hello) => opened,
        // Killed while connecting: a handshake cut short, which a dead process leaves too.
        _ = killed(mode) => return End::Killed,
    };
    let Session { conn, mut send, mut msgs, reader, welcome } = match opened {
        Ok(session) => session,
        // A simulated agent links to one coordinator: a follower's answer is a failure to link.
        Err(OpenError::Failed(_) | OpenError::FollowLeader(_)) => return End::Failed,
        Err(OpenError::Refused(refusal)) => return End::Refused(refusal.to_string()),
    };
    let welcomed_ns = shared.epoch.elapsed().as_nanos() as u64;
    me.welcomed_at_ns.store(welcomed_ns.max(1), Ordering::Relaxed);
    me.linked.store(true, Ordering::Relaxed);
    shared.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
    let interval = report_interval(&welcome);
    let silence = silence_limit(interval);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    loop {
        let silent = *mode.borrow() == Mode::Silent;
        tokio::select! {
            _ = ticker.tick() => {
                if last_heard.elapsed() > silence {
                    return End::Dropped;
                }
                if silent {
                    continue;
                }
                seq += 1;
                let report = figures.report(rng, seq, &me.creds.name, me.applied_generation.load(Ordering::Relaxed));
                in_flight.push_back((seq, Instant::now()));
                if in_flight.len() > 64 {
                    in_flight.pop_front();
                }
                if wire::write_frame(&mut send, &AgentMessage::Report(Box::new(report))).await.is_err() {
                    return End::Dropped;
                }
                shared.stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            }
            msg = msgs.recv(), if !silent => match msg {
                None | Some(Err(_)) => return End::Dropped,
                Some(Ok(CoordinatorMessage::ReportAck { seq: acked })) => {
                    last_heard = Instant::now();
                    while let Some((sent, at)) = in_flight.pop_front() {
                        if sent == acked {
                            shared.stats.latency(at.elapsed());
                            shared.stats.reports_acked.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                Some(Ok(CoordinatorMessage::Spec(spec))) => {
                    last_heard = Instant::now();
                    shared.stats.specs_received.fetch_add(1, Ordering::Relaxed);
                    let generation = spec.generation;
                    let status = AppliedStatus { generation, outcome: ApplyOutcome::Applied };
                    if wire::write_frame(&mut send, &AgentMessage::Applied(status)).await.is_err() {
                        return End::Dropped;
                    }
                    me.applied_generation.fetch_max(generation, Ordering::Relaxed);
                    shared.stats.specs_applied.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow_and_update() == Mode::Killed {
                    // Dropping the stream or the connection would tell the coordinator (a FIN, a
                    // CONNECTION_CLOSE): everything is kept, unused, until the coordinator closes
                    // the connection or it times out.
                    tokio::spawn(async move {
                        let _left_behind = (send, msgs, reader);
                        conn.closed().await;
                    });
                    return End::Killed;
                }
            }
        }
    }
}

/// What one simulated node reports: fixed capacity, usage that drifts, pods that come and go.
#[derive(Debug)]
struct Figures {
    capacity: Resources,
    allocatable: Resources,
    cpu_used: f64,
    memory_used: f64,
    disk_used: f64,
    load: f32,
    pods: Vec<PodInfo>,
    pod_serial: u64,
    node: usize,
}

const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

impl Figures {
    fn new(rng: &mut StdRng, node: usize, pods: usize) -> Figures {
        let cores = [4u64, 8, 16][rng.random_range(0..3)];
        let capacity = Resources {
            cpu_millis: cores * 1000,
            memory_bytes: (cores * 4) << 30,
            ephemeral_bytes: 200 << 30,
            pods: 110,
        };
        let allocatable = Resources {
            cpu_millis: capacity.cpu_millis - 250,
            memory_bytes: capacity.memory_bytes - (1 << 30),
            ephemeral_bytes: capacity.ephemeral_bytes - (10 << 30),
            pods: 110,
        };
        let mut figures = Figures {
            capacity,
            allocatable,
            cpu_used: capacity.cpu_millis as f64 * rng.random_range(0.1..0.5),
            memory_used: capacity.memory_bytes as f64 * rng.random_range(0.2..0.6),
            disk_used: capacity.ephemeral_bytes as f64 * rng.random_range(0.1..0.4),
            load: rng.random_range(0.2..2.0),
            pods: Vec::new(),
            pod_serial: 0,
            node,
        };
        for slot in 0..pods {
            let pod = figures.new_pod(rng, slot);
            figures.pods.push(pod);
        }
        figures
    }

    fn new_pod(&mut self, rng: &mut StdRng, slot: usize) -> PodInfo {
        self.pod_serial += 1;
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let n = self.node as u32;
        PodInfo {
            namespace: format!("hx-{tenant}"),
            name: format!("web-{:x}-{}", n, self.pod_serial),
            uid: format!("{:08x}-{:04x}-4000-8000-{:012x}", n, slot, self.pod_serial),
            ip: Some(Ipv4Addr::new(10, 64 + ((n >> 8) % 64) as u8, (n & 0xff) as u8, (slot % 250 + 2) as u8)),
            tenant: Some(tenant.to_string()),
        }
    }

    /// A random walk, kept within `[lo, hi]`.
    fn drift(rng: &mut StdRng, value: f64, step: f64, lo: f64, hi: f64) -> f64 {
        (value + rng.random_range(-step..step)).clamp(lo, hi)
    }

    fn report(&mut self, rng: &mut StdRng, seq: u64, name: &str, applied_generation: u64) -> CapacityReport {
        let cpu = self.capacity.cpu_millis as f64;
        let memory = self.capacity.memory_bytes as f64;
        let disk = self.capacity.ephemeral_bytes as f64;
        self.cpu_used = Self::drift(rng, self.cpu_used, cpu * 0.03, 0.0, cpu);
        self.memory_used = Self::drift(rng, self.memory_used, memory * 0.01, memory * 0.05, memory * 0.95);
        self.disk_used = Self::drift(rng, self.disk_used, disk * 0.001, 0.0, disk * 0.9);
        self.load = (self.load + rng.random_range(-0.1f32..0.1)).clamp(0.0, 64.0);
        // About one pod replaced per node per minute.
        if !self.pods.is_empty() && rng.random_range(0..60) == 0 {
            let slot = rng.random_range(0..self.pods.len());
            self.pods[slot] = self.new_pod(rng, slot);
        }
        let psi = |rng: &mut StdRng| PressureAverages {
            some_avg10: rng.random_range(0.0..5.0),
            some_avg60: rng.random_range(0.0..3.0),
            some_avg300: rng.random_range(0.0..2.0),
            full_avg10: Some(rng.random_range(0.0..1.0)),
            full_avg60: Some(rng.random_range(0.0..0.5)),
            full_avg300: Some(rng.random_range(0.0..0.2)),
        };
        let mut tenant_usage: Vec<TenantUsage> = Vec::new();
        for pod in &self.pods {
            let tenant = pod.tenant.clone().unwrap_or_default();
            match tenant_usage.iter_mut().find(|t| t.tenant == tenant) {
                Some(t) => t.pods += 1,
                None => tenant_usage.push(TenantUsage {
                    tenant,
                    pods: 1,
                    cpu_millis: 0,
                    memory_bytes: 0,
                    pids: 0,
                    cpu_split: false,
                    memory_pressure: false,
                }),
            }
        }
        let share = 1.0 / self.pods.len().max(1) as f64;
        for t in &mut tenant_usage {
            t.cpu_millis = (self.cpu_used * share * f64::from(t.pods)) as u64;
            t.memory_bytes = (self.memory_used * share * f64::from(t.pods)) as u64;
            t.pids = u64::from(t.pods) * 12;
        }
        tenant_usage.sort();
        CapacityReport {
            seq,
            node_name: name.to_string(),
            collected_at_unix_ms: hexa_shared::clock::now_unix_ms(),
            capacity: self.capacity,
            allocatable: self.allocatable,
            usage: Usage {
                cpu_used_millis: self.cpu_used as u64,
                memory_available_bytes: (memory - self.memory_used) as u64,
                ephemeral_available_bytes: (disk - self.disk_used) as u64,
                load1: self.load,
                load5: self.load * 0.9,
                load15: self.load * 0.8,
                pressure: Pressure { cpu: Some(psi(rng)), memory: Some(psi(rng)), io: Some(psi(rng)) },
            },
            cgroup_limits: Default::default(),
            applied_generation,
            k3s: K3sState::Running { version: "v1.35.5+k3s1".into(), cluster_ca_sha256: None },
            pods: self.pods.clone(),
            tenant_usage,
            firewall_displacements: 0,
            isolation: Default::default(),
        }
    }
}

/// A UDP socket that drops every datagram, both ways, while `cut` is set.
#[derive(Debug)]
struct Cuttable {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    cut: Arc<AtomicBool>,
}

impl quinn::AsyncUdpSocket for Cuttable {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        if self.cut.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(_)) if self.cut.load(Ordering::Relaxed) => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
