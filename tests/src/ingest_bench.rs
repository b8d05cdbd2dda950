//! `hexa-bench ingest`: how many simulated agents one coordinator process serves at a report
//! interval, against the same fleet on a bare QUIC server measured in the same run.
//!
//! The coordinator is the real `hexa-coordinator` binary beside `hexa-bench`, in its own process,
//! on a state directory on disk. The fleet is [`crate::sim`]: real QUIC connections, one
//! certificate per agent, each enrolled with a token of its own minted through the admin API. For
//! each fleet size of the sweep (the fleet grows from one step to the next):
//!
//! 1. the new agents' tokens are minted and the agents enrolled (`enrollments_per_sec`);
//! 2. every agent links, a warm-up passes, and over the steady window the acknowledged reports
//!    (`reports_per_sec`), report-to-ack latency (`p50_ms`, `p99_ms`; the coordinator acks after
//!    recording the report in its inventory), and the coordinator's resident memory and CPU (from
//!    `/proc/<pid>/stat`) are taken;
//! 3. the coordinator is killed (SIGKILL) and started again on the same state directory;
//!    `reconnect_all_s` is the time from the kill until every agent has been welcomed again (the
//!    agents notice the silence and come back with the agent's jittered backoff);
//! 4. the baseline: the same agents, credentials and report sizes against a bare quinn server in a
//!    process of its own (same TLS configuration and CA, same framing), which decodes each report
//!    and acks it and keeps nothing: the floor of this transport on this machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use hexa_shared::names::Pool;
use hexa_shared::pki::{self, CaHash};
use hexa_shared::proto::{AgentMessage, CoordinatorMessage, Welcome};
use hexa_shared::wire;

use crate::admin::AdminClient;
use crate::sim::{Fleet, FleetConfig};

/// What one sweep is run with.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub agents: Vec<usize>,
    pub interval: Duration,
    /// Length of the steady window.
    pub window: Duration,
    pub warmup: Duration,
    /// Agents per client endpoint (per simulated source address).
    pub agents_per_endpoint: usize,
    /// Enrollments in flight at once.
    pub concurrency: usize,
    /// Where `hexa-coordinator` is (default: beside this binary).
    pub bin_dir: Option<PathBuf>,
    /// Where the coordinator's state directory goes (default: a temporary directory).
    pub work_dir: Option<PathBuf>,
}

/// How long every agent gets to link before the step is given up.
const LINK_TIMEOUT: Duration = Duration::from_secs(300);

/// A child process that is killed when dropped.
#[derive(Debug)]
struct Proc {
    child: Child,
    stdout: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest.
    async fn line_after(&mut self, prefix: &str, what: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(rest) = self.stdout_text().lines().find_map(|l| l.strip_prefix(prefix)) {
                return Ok(rest.trim().to_string());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("{what} exited with {status} before it was ready");
            }
            anyhow::ensure!(Instant::now() < deadline, "{what} was not ready within 120s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(program: &Path, args: &[String], dir: &Path, name: &str) -> anyhow::Result<Proc> {
    let stdout = dir.join(format!("{name}.out"));
    let child = Command::new(program)
        .args(args)
        // The binary's own default log level, as an operator runs it.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(Proc { child, stdout })
}

/// CPU time (user + system, in clock ticks) and resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
    at: Instant,
}

fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(14) + field(15);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample { ticks, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:"), at: Instant::now() })
}

fn clock_ticks_per_sec() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on; getconf says so without unsafe code.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_pct(start: Sample, end: Sample, hz: f64) -> f64 {
    let seconds = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
    round2(end.ticks.saturating_sub(start.ticks) as f64 / hz / seconds * 100.0)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn mib(kib: u64) -> f64 {
    round2(kib as f64 / 1024.0)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    let idx = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us.get(idx).map_or(0.0, |us| round2(f64::from(*us) / 1000.0))
}

fn percentile_s(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).map_or(0.0, |d| round2(d.as_secs_f64()))
}

/// The coordinator as a process, restartable on the same ports and state directory.
#[derive(Debug)]
struct CoordinatorProc {
    proc: Proc,
    config: PathBuf,
    dir: PathBuf,
    program: PathBuf,
    starts: usize,
}

impl CoordinatorProc {
    async fn start(program: &Path, dir: &Path, config: &Path) -> anyhow::Result<(CoordinatorProc, CaHash)> {
        let mut me = CoordinatorProc {
            proc: spawn(program, &["--config".into(), config.display().to_string()], dir, "coordinator-0")?,
            config: config.to_path_buf(),
            dir: dir.to_path_buf(),
            program: program.to_path_buf(),
            starts: 1,
        };
        let ca = me.proc.line_after("CA ", "hexa-coordinator").await?.parse()?;
        me.proc.line_after("QUIC ", "hexa-coordinator").await?;
        Ok((me, ca))
    }

    /// SIGKILL, then a start on the same state directory; returns once it serves.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        let name = format!("coordinator-{}", self.starts);
        self.starts += 1;
        self.proc = spawn(&self.program, &["--config".into(), self.config.display().to_string()], &self.dir, &name)?;
        self.proc.line_after("QUIC ", "hexa-coordinator").await?;
        Ok(())
    }
}

/// Refusals before or during admission, by reason, from the coordinator's `/metrics`.
async fn refusals(admin: &AdminClient) -> BTreeMap<String, u64> {
    let Ok((200, body)) = admin.request_raw(reqwest::Method::GET, "/metrics", None).await else {
        return BTreeMap::new();
    };
    let text = body.as_str().unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("hexa_refusals_total{reason=\""))
        .filter_map(|l| l.split_once("\"} "))
        .filter_map(|(reason, n)| n.trim().parse().ok().map(|n| (reason.to_string(), n)))
        .collect()
}

async fn wait_linked(fleet: &Fleet, since: Instant, what: &str) -> anyhow::Result<Duration> {
    let deadline = since + LINK_TIMEOUT;
    loop {
        if fleet.linked_since(since) == fleet.len() {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: only {} of {} agents linked within {}s",
            fleet.linked_since(since),
            fleet.len(),
            LINK_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Steady-state figures of one target over the window.
#[derive(Debug)]
struct Steady {
    reports_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    rss_peak_mib: f64,
    cpu_pct: f64,
    sim_cpu_pct: f64,
}

async fn steady(fleet: &Fleet, pid: u32, settings: &IngestSettings, hz: f64) -> anyhow::Result<Steady> {
    tokio::time::sleep(settings.warmup).await;
    let stats = fleet.stats();
    let _ = stats.take_latencies();
    let acked = stats.reports_acked.load(Ordering::Relaxed);
    let (start, me) = (sample(pid)?, sample(std::process::id())?);
    tokio::time::sleep(settings.window).await;
    let (end, me_end) = (sample(pid)?, sample(std::process::id())?);
    let acked = stats.reports_acked.load(Ordering::Relaxed) - acked;
    let latencies = stats.take_latencies();
    Ok(Steady {
        reports_per_sec: round2(acked as f64 / end.at.duration_since(start.at).as_secs_f64()),
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
        rss_mib: mib(end.rss_kib),
        rss_peak_mib: mib(end.hwm_kib),
        cpu_pct: cpu_pct(start, end, hz),
        sim_cpu_pct: cpu_pct(me, me_end, hz),
    })
}

/// Every simulated agent links from 127.0.0.1, where a real fleet has an address per node: the
/// per-address bound is raised to the total one, so only the coordinator-wide bound applies.
fn write_config(dir: &Path, quic_port: u16, admin_port: u16, interval: Duration) -> anyhow::Result<PathBuf> {
    let path = dir.join("coordinator.toml");
    let interval_ms = interval.as_millis();
    let text = format!(
        "state_dir = \"{}\"\nquic_listen = \"127.0.0.1:{quic_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         report_interval = \"{interval_ms}ms\"\nunreachable_after = \"{}ms\"\nlost_after = \"30s\"\n\
         [k3s]\nmanage = false\n[hostcluster]\nmode = \"off\"\n[isolation]\nenabled = false\n\
         [admission]\nmax_per_address = 256\n",
        dir.join("state").display(),
        interval_ms * 3,
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Mints `count` shared-pool tokens, a few requests at a time.
async fn mint(admin: &AdminClient, count: usize) -> Vec<String> {
    let mut tokens = Vec::with_capacity(count);
    let mut running = tokio::task::JoinSet::new();
    let mut left = count;
    loop {
        while running.len() < 8 && left > 0 {
            let admin = admin.clone();
            running.spawn(async move { admin.token("shared", "2h").await });
            left -= 1;
        }
        match running.join_next().await {
            Some(Ok(token)) => tokens.push(token),
            Some(Err(e)) => panic!("minting a token failed: {e}"),
            None => return tokens,
        }
    }
}

pub async fn ingest(settings: IngestSettings) -> anyhow::Result<()> {
    let hz = clock_ticks_per_sec();
    let temp = tempfile::tempdir_in(settings.work_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let dir = temp.path();
    let bin_dir = match &settings.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let (quic_port, admin_port, floor_port) = (crate::free_port(), crate::free_port(), crate::free_port());
    let config = write_config(dir, quic_port, admin_port, settings.interval)?;
    let (mut coordinator, ca_hash) = CoordinatorProc::start(&bin_dir.join("hexa-coordinator"), dir, &config).await?;
    let admin_token = std::fs::read_to_string(dir.join("state/admin.token"))?.trim().to_string();
    let admin = AdminClient::new(format!("http://127.0.0.1:{admin_port}"), admin_token);
    let coordinator_addr: SocketAddr = ([127, 0, 0, 1], quic_port).into();
    let floor_addr: SocketAddr = ([127, 0, 0, 1], floor_port).into();
    let mut floor = spawn(
        &std::env::current_exe()?,
        &[
            "ack-floor".into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--listen".into(),
            floor_addr.to_string(),
            "--interval-ms".into(),
            settings.interval.as_millis().to_string(),
        ],
        dir,
        "ack-floor",
    )?;
    floor.line_after("ready", "the baseline server").await?;

    println!(
        "{}",
        json!({"bench": "ingest", "subject": "context",
            "interval_s": settings.interval.as_secs_f64(),
            "targets": {"agents": 10_000, "interval_s": 1, "p99_ms_below": 100, "coordinator_rss_mib_below": 1024,
                        "coordinator_cpu_pct_below": 100, "reconnect_all_s_below": 30},
            "kubernetes_node_lease_writes_per_sec_at_5000_nodes": 500,
            "nomad_default_max_heartbeats_per_sec": 50,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)})
    );

    let max_agents = settings.agents.iter().copied().max().unwrap_or(0);
    let fleet_config = FleetConfig {
        endpoints: max_agents.div_ceil(settings.agents_per_endpoint.max(1)).max(1),
        ..FleetConfig::new(coordinator_addr, ca_hash)
    };
    let mut fleet = Fleet::new(&fleet_config)?;
    for &agents in &settings.agents {
        let new = agents.saturating_sub(fleet.len());
        let tokens = mint(&admin, new).await;
        let began = Instant::now();
        fleet.enroll(tokens, settings.concurrency).await?;
        let enroll_s = began.elapsed().as_secs_f64();

        // The coordinator at steady state.
        fleet.retarget(coordinator_addr);
        let t0 = Instant::now();
        fleet.start_all();
        let link_all_s = wait_linked(&fleet, t0, "first links").await?;
        let ours = steady(&fleet, coordinator.proc.pid(), &settings, hz).await?;
        let refused_before = refusals(&admin).await;

        // Restart: kill -9 and start on the same state directory.
        let killed = Instant::now();
        coordinator.restart().await?;
        let serving_s = killed.elapsed().as_secs_f64();
        let reconnect = wait_linked(&fleet, killed, "reconnect after restart").await?;
        let welcomes = fleet.welcome_times_since(killed);
        let refused_after = refusals(&admin).await;
        let restart_rss = sample(coordinator.proc.pid())?;

        println!(
            "{}",
            json!({"bench": "ingest", "subject": "hexa-coordinator", "agents": agents,
                "interval_s": settings.interval.as_secs_f64(),
                "reports_per_sec": ours.reports_per_sec, "p50_ms": ours.p50_ms, "p99_ms": ours.p99_ms,
                "coordinator_rss_mib": ours.rss_mib, "coordinator_rss_peak_mib": ours.rss_peak_mib,
                "coordinator_cpu_pct": ours.cpu_pct,
                "enrollments_per_sec": round2(new as f64 / enroll_s.max(1e-9)), "enrolled": new,
                "link_all_s": round2(link_all_s.as_secs_f64()),
                "reconnect_all_s": round2(reconnect.as_secs_f64()),
                "restart_serving_s": round2(serving_s),
                "reconnect_p50_s": percentile_s(&welcomes, 0.5), "reconnect_p99_s": percentile_s(&welcomes, 0.99),
                "coordinator_rss_after_restart_mib": mib(restart_rss.rss_kib),
                "refusals_steady": refused_before, "refusals_after_restart": refused_after,
                "simulator_cpu_pct": ours.sim_cpu_pct})
        );

        // The baseline: the same fleet against the bare server.
        fleet.kill_all();
        fleet.retarget(floor_addr);
        let t0 = Instant::now();
        fleet.start_all();
        wait_linked(&fleet, t0, "links to the baseline server").await?;
        let base = steady(&fleet, floor.pid(), &settings, hz).await?;
        fleet.kill_all();
        println!(
            "{}",
            json!({"bench": "ingest", "subject": "baseline: bare quinn server, same TLS and framing, acks each report, keeps nothing",
                "agents": agents, "interval_s": settings.interval.as_secs_f64(),
                "reports_per_sec": base.reports_per_sec, "p50_ms": base.p50_ms, "p99_ms": base.p99_ms,
                "rss_mib": base.rss_mib, "cpu_pct": base.cpu_pct, "simulator_cpu_pct": base.sim_cpu_pct})
        );
        let ratio = |a: f64, b: f64| round2(a / b.max(1e-9));
        println!(
            "{}",
            json!({"bench": "ingest", "subject": "ratio coordinator/baseline", "agents": agents,
                "cpu": ratio(ours.cpu_pct, base.cpu_pct), "rss": ratio(ours.rss_mib, base.rss_mib),
                "p50": ratio(ours.p50_ms, base.p50_ms), "p99": ratio(ours.p99_ms, base.p99_ms),
                "reports_per_sec": ratio(ours.reports_per_sec, base.reports_per_sec)})
        );
        fleet.retarget(coordinator_addr);
    }
    fleet.shutdown().await;
    drop(floor);
    drop(coordinator);
    Ok(())
}

/// The baseline server: the coordinator's TLS configuration and CA (loaded from its state
/// directory), the link's framing, a welcome for each hello and an ack for each report; nothing
/// is kept. Prints `ready <addr>` once it listens.
pub async fn ack_floor(state_dir: &Path, listen: SocketAddr, interval_ms: u64) -> anyhow::Result<()> {
    let (ca, _) = hexa_coordinator::bootstrap::CertificateAuthority::load_or_create(state_dir)?;
    let (chain, key) = ca.issue_server_cert()?;
    let endpoint = quinn::Endpoint::server(pki::server_config(ca.cert_der(), chain, key)?, listen)?;
    println!("ready {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let name = pki::peer_certificates(&conn)
                .and_then(|chain| chain.first().and_then(|der| pki::cert_identity(der).ok()))
                .map(|id| id.common_name)
                .unwrap_or_default();
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            if !matches!(wire::read_payload(&mut recv).await, Ok(Some(_))) {
                return;
            }
            let welcome = CoordinatorMessage::Welcome(Welcome {
                node_name: name,
                pool: Pool::Shared,
                report_interval_ms: interval_ms,
            });
            if wire::write_frame(&mut send, &welcome).await.is_err() {
                return;
            }
            while let Ok(Some(payload)) = wire::read_payload(&mut recv).await {
                if let Ok(AgentMessage::Report(report)) = wire::decode_payload::<AgentMessage>(&payload) {
                    let ack = CoordinatorMessage::ReportAck { seq: report.seq };
                    if wire::write_frame(&mut send, &ack).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    Ok(())
}
