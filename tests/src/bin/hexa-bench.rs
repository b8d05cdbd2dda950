//! `hexa-bench`: benchmarks that print one JSON line per measurement and compare the product with
//! a baseline measured in the same run, so that ratios hold on a noisy machine.
//!
//! - `agent-footprint [--seconds N]`: resident memory and CPU share of a `hexa-agent` process at a
//!   1 s report interval, against a bare QUIC client that sends a fixed report every second (the
//!   floor any agent on this transport pays).
//! - `link-latency [--nodes N] [--reports N]`: enrollment latency and report round trip on
//!   loopback, against a plain QUIC request/echo of the same size on the same machine.
//! - `hostcluster [--tenants 1000]`: realising tenants on the fake Kubernetes API server, from
//!   scratch and again with nothing to change, against applying every object every pass.
//! - `k3s-noop [--iterations N]`: wall time of applying a K3s spec the node already matches,
//!   against reading the files such an apply must compare (the least any check can do).
//! - `firewall-batch [--tenants 500] [--pod-ips 20000]`: one atomic iptables-restore/ipset-restore
//!   batch against one `iptables`/`ipset` invocation per rule, in fresh network namespaces (root).
//! - `hostile-enroll [--peers 1000] [--honest 20]`: the coordinator's peak memory while honest
//!   agents enroll and report, alone and beside a flood of hostile enrollment connections.
//! - `slow-headers [--slow 300] [--requests 200]`: `/healthz` latency alone and beside
//!   connections that never finish their request headers.
//! - `placement [--nodes 1000,10000] [--tenants-per-node 10] [--seed 1]`: our placement against
//!   first-fit-decreasing and Kubernetes' LeastAllocated and MostAllocated scoring, on the same
//!   synthetic fleets.
//! - `proxmox [--vms 20] [--tenants 10] [--scale 1.0]`: dedicated tenants on the Proxmox VE
//!   emulator with realistic task times (times `scale`), request to all Ready, every VM at once
//!   against one step at a time; Proxmox API calls per VM.
//! - `store [--tenants 300] [--nodes 10]`: tenant creates per second through the coordinator's
//!   tenants service with its state on a real three-member etcd cluster on loopback, against the
//!   same with its state in the redb file.
//! - `ingest [--agents 1000,5000,10000] [--interval 1s] [--seconds 20]`: simulated agents
//!   (`hexa_tests::sim`) against the `hexa-coordinator` process: sustained acknowledged reports,
//!   report-to-ack latency, the coordinator's memory and CPU, enrollments per second, and the time
//!   for every agent to link again after the coordinator is killed and restarted; against the same
//!   fleet on a bare QUIC server that only acks (see `hexa_tests::ingest_bench`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;

use hexa_shared::proto::{AgentMessage, CoordinatorMessage, PROTOCOL_VERSION};
use hexa_shared::report::CapacityReport;
use hexa_shared::wire;
use hexa_tests::inproc::Coordinator;
use hexa_tests::raw;

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    AgentFootprint {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Directory holding the hexa-agent binary to measure (default: beside this one)
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    LinkLatency {
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        #[arg(long, default_value_t = 2000)]
        reports: usize,
    },
    FirewallBatch {
        #[arg(long, default_value_t = 500)]
        tenants: usize,
        #[arg(long, default_value_t = 20_000)]
        pod_ips: usize,
    },
    Hostcluster {
        #[arg(long, default_value_t = 1000)]
        tenants: usize,
    },
    K3sNoop {
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
    },
    Proxmox {
        #[arg(long, default_value_t = 20)]
        vms: usize,
        #[arg(long, default_value_t = 10)]
        tenants: usize,
        /// Factor on the emulator's realistic task times (0.25: four times faster)
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
    HostileEnroll {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        #[arg(long, default_value_t = 20)]
        honest: usize,
    },
    SlowHeaders {
        #[arg(long, default_value_t = 300)]
        slow: usize,
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    Placement {
        /// Fleet sizes, comma separated
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        tenants_per_node: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    Store {
        #[arg(long, default_value_t = 300)]
        tenants: usize,
        #[arg(long, default_value_t = 10)]
        nodes: usize,
    },
    Ingest {
        /// Fleet sizes, comma separated; the fleet grows from one to the next
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        agents: Vec<usize>,
        /// Report interval the coordinator asks for
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Length of each steady window
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Warm-up before each window
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        /// Simulated agents per client endpoint (each endpoint has its own loopback address)
        #[arg(long, default_value_t = 20)]
        agents_per_endpoint: usize,
        /// Enrollments in flight at once
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Directory holding the hexa-coordinator binary (default: beside this one)
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Where the coordinator's state directory is made (default: the temporary directory)
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Internal: the baseline server of ingest.
    AckFloor {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        interval_ms: u64,
    },
    /// Internal: the baseline process of agent-footprint.
    QuicFloor {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        pin: String,
        #[arg(long)]
        token: String,
    },
}

fn main() -> anyhow::Result<()> {
    hexa_shared::install_crypto_provider();
    let args = Args::parse();
    match args.command {
        Command::Placement { nodes, tenants_per_node, seed } => placement(&nodes, tenants_per_node, seed),
        Command::FirewallBatch { tenants, pod_ips } => {
            let figures = hexa_agent::isolation::firewall::bench::bench_batch_vs_per_rule(tenants, pod_ips)?;
            let mut line = serde_json::to_value(&figures)?;
            line["bench"] = json!("firewall_batch");
            println!("{line}");
            Ok(())
        }
        Command::Ingest { agents, interval, seconds, warmup, agents_per_endpoint, concurrency, bin_dir, work_dir } => {
            // The simulator gets the machine's cores, as the coordinator process does.
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let settings = hexa_tests::ingest_bench::IngestSettings {
                agents,
                interval,
                window: Duration::from_secs(seconds),
                warmup: Duration::from_secs(warmup),
                agents_per_endpoint,
                concurrency,
                bin_dir,
                work_dir,
            };
            rt.block_on(hexa_tests::ingest_bench::ingest(settings))
        }
        Command::AckFloor { state_dir, listen, interval_ms } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(hexa_tests::ingest_bench::ack_floor(&state_dir, listen, interval_ms))
        }
        Command::QuicFloor { addr, pin, token } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(quic_floor(addr, pin.parse()?, token))
        }
        command => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            rt.block_on(async move {
                match command {
                    Command::AgentFootprint { seconds, bin_dir } => agent_footprint(seconds, bin_dir).await,
                    Command::LinkLatency { nodes, reports } => link_latency(nodes, reports).await,
                    Command::K3sNoop { iterations } => k3s_noop(iterations).await,
                    Command::Hostcluster { tenants } => hostcluster(tenants).await,
                    Command::Store { tenants, nodes } => store(tenants, nodes).await,
                    Command::Proxmox { vms, tenants, scale } => {
                        hexa_tests::pve_bench::proxmox(vms, tenants, scale).await
                    }
                    Command::HostileEnroll { peers, honest } => {
                        hexa_tests::trust_bench::hostile_enroll(peers, honest).await
                    }
                    Command::SlowHeaders { slow, requests } => {
                        hexa_tests::trust_bench::slow_headers(slow, requests).await
                    }
                    Command::QuicFloor { .. }
                    | Command::Placement { .. }
                    | Command::FirewallBatch { .. }
                    | Command::Ingest { .. }
                    | Command::AckFloor { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    }
}

/// Every algorithm on the same seeded fleet, one JSON line each. Single-threaded: one core.
fn placement(fleets: &[usize], tenants_per_node: usize, seed: u64) -> anyhow::Result<()> {
    use hexa_coordinator::placement::bench::{Algorithm, run_case};
    for &nodes in fleets {
        for algorithm in Algorithm::ALL {
            let figures = run_case(algorithm, nodes, nodes * tenants_per_node, seed)?;
            let mut line = serde_json::to_value(&figures)?;
            line["bench"] = json!("placement");
            line["algorithm"] = json!(algorithm.name());
            println!("{line}");
        }
    }
    Ok(())
}

/// Nodes enrolled by hand that report a large capacity every second, so a thousand tenants fit.
async fn big_nodes(coordinator: &Coordinator, count: usize) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let (addr, pin) = (coordinator.running.quic_addr, coordinator.running.ca_hash);
    let mut tasks = Vec::new();
    for i in 0..count {
        let name = format!("big-{i}");
        let creds = raw::enroll_node(addr, pin, &coordinator.admin.token("shared", "10m").await, &name).await;
        let mut link = raw::open_link(addr, creds.link_config()).await.map_err(anyhow::Error::msg)?;
        link.send(&raw::hello(&name, PROTOCOL_VERSION)).await;
        let _welcome: Option<CoordinatorMessage> = link.recv().await;
        tasks.push(tokio::spawn(async move {
            let mut recv = link.recv;
            tokio::spawn(async move { while let Ok(Some(_)) = wire::read_payload(&mut recv).await {} });
            for seq in 1.. {
                let big = hexa_shared::report::Resources {
                    cpu_millis: 1_000_000,
                    memory_bytes: 1 << 42,
                    ephemeral_bytes: 1 << 42,
                    pods: 10_000,
                };
                let mut report = sample_report(seq);
                if let AgentMessage::Report(r) = &mut report {
                    r.capacity = big;
                    r.allocatable = big;
                    r.usage.memory_available_bytes = big.memory_bytes;
                }
                let Ok(frame) = wire::encode_frame(&report) else { return };
                if link.send.write_all(&frame).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    Ok(tasks)
}

async fn hostcluster(count: usize) -> anyhow::Result<()> {
    use hexa_coordinator::hostcluster::reconcile::HostCluster;
    use hexa_coordinator::hostcluster::render::{self, Mode, RenderSettings};
    use hexa_tests::fake_kube::FakeKube;
    let coordinator = production_coordinator().await;
    let nodes = big_nodes(&coordinator, 10).await?;
    let kube = FakeKube::start().await;
    for i in 0..10 {
        kube.add_node(&format!("big-{i}"), &[]).map_err(anyhow::Error::msg)?;
    }
    // Wait for the nodes' reports, then place the tenants.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tenants = coordinator.running.tenants.clone();
    for i in 0..count {
        let plan = smallest_shared_plan();
        tenants.create(&format!("t{i:04}"), plan).await?;
    }
    let client = kube::Client::try_from(kube::Config::new(kube.url().parse()?))?;
    let settings = RenderSettings { mode: Mode::Apply, ..RenderSettings::default() };
    let classes = hexa_shared::tenant::NodeClass::defaults();
    let ours = HostCluster::with_client(client.clone(), settings.clone(), classes.clone(), tenants.clone());

    let mut figures = Vec::new();
    for pass in ["from scratch", "no change"] {
        let writes_before = kube.writes();
        let began = Instant::now();
        let report = ours.reconcile().await;
        let seconds = began.elapsed().as_secs_f64();
        // Namespaces and HelmCharts; node patches (one per node holding tenants) come on top.
        let objects = 2 * count;
        figures.push(json!({"bench": "hostcluster_reconcile", "subject": format!("hexa reconciler, {pass}"),
            "tenants": count, "objects": objects, "seconds": (seconds * 1000.0).round() / 1000.0,
            "objects_per_sec": (objects as f64 / seconds).round(), "writes": kube.writes() - writes_before,
            "failures": report.failures}));
    }
    // Baseline: a reconciler without no-op detection server-side applies every object every pass.
    let all = tenants.list().await;
    let namespaces = kube::Api::<kube::api::DynamicObject>::all_with(
        client.clone(),
        &kube::core::ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Namespace".into(),
            plural: "namespaces".into(),
        },
    );
    let charts = kube::Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        render::HELM_CHART_NAMESPACE,
        &kube::core::ApiResource {
            group: "helm.cattle.io".into(),
            version: "v1".into(),
            api_version: "helm.cattle.io/v1".into(),
            kind: "HelmChart".into(),
            plural: "helmcharts".into(),
        },
    );
    let params = kube::api::PatchParams::apply(render::FIELD_MANAGER).force();
    let writes_before = kube.writes();
    let began = Instant::now();
    for tenant in &all {
        let ns = serde_json::to_value(render::namespace(tenant, &settings))?;
        namespaces
            .patch(&hexa_shared::names::tenant_namespace(&tenant.name), &params, &kube::api::Patch::Apply(&ns))
            .await?;
        let chart = serde_json::to_value(render::helm_chart(tenant, &classes, &settings)?)?;
        charts.patch(&render::release_name(&tenant.name), &params, &kube::api::Patch::Apply(&chart)).await?;
    }
    let seconds = began.elapsed().as_secs_f64();
    figures.push(json!({"bench": "hostcluster_reconcile", "subject": "baseline: apply every object, no change",
        "tenants": count, "objects": 2 * count, "seconds": (seconds * 1000.0).round() / 1000.0,
        "objects_per_sec": ((2 * count) as f64 / seconds).round(), "writes": kube.writes() - writes_before}));
    for line in figures {
        println!("{line}");
    }
    for task in nodes {
        task.abort();
    }
    Ok(())
}

/// Tenant creates through the real path (placement, the durable commit of the tenant, the nodes'
/// new specs) on each backend, one after another in the same run.
async fn store(count: usize, nodes: usize) -> anyhow::Result<()> {
    use hexa_coordinator::store::{BackendKind, StoreSettings};
    if let Some(why) = hexa_tests::etcd::unavailable() {
        anyhow::bail!("store: {why}");
    }
    let cluster = tokio::task::spawn_blocking(|| hexa_tests::etcd::EtcdCluster::start(3)).await?;
    let etcd = StoreSettings { backend: BackendKind::Etcd, endpoints: cluster.endpoints(), ..StoreSettings::default() };
    for (name, settings) in [("redb", StoreSettings::default()), ("etcd, 3 members on loopback", etcd)] {
        let coordinator = Coordinator::start_tuned(|config| {
            let defaults = hexa_coordinator::config::CoordinatorConfig::default();
            config.report_interval = defaults.report_interval;
            config.unreachable_after = defaults.unreachable_after;
            config.lost_after = defaults.lost_after;
            config.store = settings;
        })
        .await;
        let node_tasks = big_nodes(&coordinator, nodes).await?;
        // Wait for the nodes' reports, then create the tenants one after another.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tenants = coordinator.running.tenants.clone();
        let mut latencies = Vec::with_capacity(count);
        let began = Instant::now();
        for i in 0..count {
            let plan = smallest_shared_plan();
            let asked = Instant::now();
            tenants.create(&format!("t{i:04}"), plan).await?;
            latencies.push(asked.elapsed());
        }
        let seconds = began.elapsed().as_secs_f64();
        latencies.sort();
        let ms = |q: f64| {
            let d = latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
            (d.as_secs_f64() * 1e5).round() / 100.0
        };
        let placed = tenants.list().await.iter().filter(|t| !t.placement.nodes().is_empty()).count();
        println!(
            "{}",
            json!({"bench": "store_tenant_create", "backend": name, "tenants": count, "placed": placed,
                "nodes": nodes, "seconds": (seconds * 1000.0).round() / 1000.0,
                "creates_per_sec": (count as f64 / seconds * 10.0).round() / 10.0,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99)})
        );
        for task in node_tasks {
            task.abort();
        }
        coordinator.running.shutdown().await;
    }
    drop(cluster);
    Ok(())
}

async fn k3s_noop(iterations: usize) -> anyhow::Result<()> {
    use hexa_agent::k3s::{self, Arch, FetchPolicy, Fetcher, RecordingSystemd};
    use hexa_shared::k3s::{ArtifactSource, JoinToken, K3sRole, K3sSpec};
    let releases = hexa_tests::artifacts::ReleaseServer::start(&["v1.35.5+k3s1"]).await;
    let root = tempfile::tempdir()?;
    let systemd = RecordingSystemd::new();
    let fetcher = Fetcher::new(Arch::of_this_machine()?, FetchPolicy::default())?;
    let mut spec = K3sSpec::new(K3sRole::Agent { server_url: "https://10.0.0.1:6443".into() });
    spec.token = Some(JoinToken::new("0123456789abcdef0123456789abcdef"));
    spec.node_name = Some("bench".into());
    spec.node_labels.insert("hexabase.ai/pool".into(), "shared".into());
    spec.kubelet_args.insert("system-reserved".into(), "cpu=250m,memory=512Mi".into());
    spec.artifacts = ArtifactSource::Url { base: releases.base.clone(), sha256: None };
    k3s::apply(root.path(), &spec, &systemd, &fetcher).await?;
    systemd.take_calls();

    let mut ours = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let began = Instant::now();
        let outcome = k3s::apply(root.path(), &spec, &systemd, &fetcher).await?;
        ours.push(began.elapsed());
        anyhow::ensure!(outcome.written.is_empty() && outcome.restarted.is_none(), "not a no-op: {outcome:?}");
    }
    anyhow::ensure!(systemd.take_calls().is_empty(), "a no-op asked the service manager to act");
    // Baseline: read every file the installed state consists of and stat the binary.
    let files = [
        "etc/rancher/k3s/config.yaml",
        "etc/systemd/system/k3s-agent.service",
        "etc/systemd/system/k3s-agent.service.env",
    ];
    let mut baseline = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let began = Instant::now();
        for file in files {
            std::hint::black_box(std::fs::read(root.path().join(file))?);
        }
        std::hint::black_box(std::fs::metadata(root.path().join("usr/local/bin/k3s"))?);
        baseline.push(began.elapsed());
    }
    let (p50, line) = summary("k3s_noop_apply", "hexa no-op apply", ours);
    println!("{line}");
    let (base, line) = summary("k3s_noop_apply", "baseline: read the 3 files and stat the binary", baseline);
    println!("{line}");
    println!(
        "{}",
        json!({"bench": "k3s_noop_apply", "subject": "ratio p50", "ratio": (p50 / base * 100.0).round() / 100.0})
    );
    Ok(())
}

fn sample_report(seq: u64) -> AgentMessage {
    AgentMessage::Report(Box::new(CapacityReport {
        seq,
        node_name: "bench".into(),
        collected_at_unix_ms: 0,
        capacity: Default::default(),
        allocatable: Default::default(),
        usage: Default::default(),
        cgroup_limits: Default::default(),
        applied_generation: 1,
        k3s: Default::default(),
        pods: Vec::new(),
        tenant_usage: Vec::new(),
        firewall_displacements: 0,
        isolation: Default::default(),
    }))
}

/// The baseline agent: enrolls, then sends the same report every second and reads the acks.
async fn quic_floor(addr: SocketAddr, pin: hexa_shared::pki::CaHash, token: String) -> anyhow::Result<()> {
    let creds = raw::enroll_node(addr, pin, &token, "floor").await;
    let mut link = raw::open_link(addr, creds.link_config()).await.map_err(anyhow::Error::msg)?;
    link.send(&raw::hello("floor", PROTOCOL_VERSION)).await;
    let _welcome: Option<CoordinatorMessage> = link.recv().await;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0;
    let mut recv = link.recv;
    tokio::spawn(async move { while let Ok(Some(_)) = wire::read_payload(&mut recv).await {} });
    loop {
        ticker.tick().await;
        seq += 1;
        let frame = wire::encode_frame(&sample_report(seq))?;
        link.send.write_all(&frame).await?;
    }
}

#[derive(Debug, Clone, Copy)]
struct ProcSample {
    cpu_ns: u64,
    rss_kib: u64,
}

fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    // CPU time in nanoseconds, summed over the process's threads (the first field of schedstat):
    // clock ticks are too coarse for a process that works a few milliseconds a second.
    let mut cpu_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let schedstat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        cpu_ns += schedstat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample { cpu_ns, rss_kib })
}

/// An in-process coordinator with the production health thresholds: reports every second.
async fn production_coordinator() -> Coordinator {
    Coordinator::start_tuned(|config| {
        let defaults = hexa_coordinator::config::CoordinatorConfig::default();
        config.report_interval = defaults.report_interval;
        config.unreachable_after = defaults.unreachable_after;
        config.lost_after = defaults.lost_after;
    })
    .await
}

async fn agent_footprint(seconds: u64, bin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let coordinator = production_coordinator().await;
    let dir = coordinator.dir.path().to_path_buf();
    let agent_bin = bin_dir
        .map(|d| d.join("hexa-agent"))
        .unwrap_or_else(|| std::env::current_exe().unwrap_or_default().with_file_name("hexa-agent"));
    let token = coordinator.admin.token("shared", "10m").await;
    let ca = coordinator.running.ca_hash.to_string();
    let addr = coordinator.running.quic_addr;
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "")?;
    let agent = std::process::Command::new(&agent_bin)
        .args(["--config", &empty.display().to_string(), "--coordinator", &addr.to_string(), "--token", &token])
        .args(["--ca-hash", &ca, "--state-dir", &dir.join("agent").display().to_string(), "--node-name", "bench"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let floor_token = coordinator.admin.token("shared", "10m").await;
    let floor = std::process::Command::new(std::env::current_exe()?)
        .args(["quic-floor", "--addr", &addr.to_string(), "--pin", &ca, "--token", &floor_token])
        .spawn()?;
    // Let both enroll and settle before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = [proc_sample(agent.id())?, proc_sample(floor.id())?];
    let mut peak = [0u64; 2];
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, pid) in [agent.id(), floor.id()].into_iter().enumerate() {
            peak[i] = peak[i].max(proc_sample(pid)?.rss_kib);
        }
    }
    let wall = began.elapsed().as_secs_f64();
    let end = [proc_sample(agent.id())?, proc_sample(floor.id())?];
    let reports = coordinator.admin.node("bench").await.and_then(|n| n.last_report_seq).unwrap_or(0);
    let mut figures = Vec::new();
    for (i, subject) in ["hexa-agent", "quic-floor"].into_iter().enumerate() {
        let cpu_pct = end[i].cpu_ns.saturating_sub(start[i].cpu_ns) as f64 / 1e9 / wall * 100.0;
        figures.push((cpu_pct, peak[i]));
        println!(
            "{}",
            json!({"bench": "agent_footprint", "subject": subject, "interval_s": 1, "seconds": wall.round(),
                   "rss_peak_mib": (peak[i] as f64 / 1024.0 * 100.0).round() / 100.0,
                   "cpu_pct_of_one_core": (cpu_pct * 1000.0).round() / 1000.0})
        );
    }
    println!(
        "{}",
        json!({"bench": "agent_footprint", "subject": "ratio agent/floor",
               "rss": (figures[0].1 as f64 / figures[1].1 as f64 * 100.0).round() / 100.0,
               "cpu": ((figures[0].0 / figures[1].0.max(0.0001)) * 100.0).round() / 100.0,
               "agent_reports_sent": reports})
    );
    for mut child in [agent, floor] {
        let _ = child.kill();
        let _ = child.wait();
    }
    coordinator.running.shutdown().await;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn summary(bench: &str, subject: &str, mut samples: Vec<Duration>) -> (f64, serde_json::Value) {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    let line = json!({"bench": bench, "subject": subject, "n": samples.len(),
        "p50_us": p50.round(), "p99_us": percentile(&samples, 0.99).round(), "max_us": percentile(&samples, 1.0).round()});
    (p50, line)
}

/// A plain QUIC echo server: the baseline for one request/answer on this machine.
async fn echo_server(
    ca_dir: &std::path::Path,
) -> anyhow::Result<(SocketAddr, rustls::pki_types::CertificateDer<'static>)> {
    let (ca, _) = hexa_coordinator::bootstrap::CertificateAuthority::load_or_create(ca_dir)?;
    let (chain, key) = ca.issue_server_cert()?;
    let endpoint =
        quinn::Endpoint::server(hexa_shared::pki::server_config(ca.cert_der(), chain, key)?, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    while let Ok(Some(payload)) = wire::read_payload(&mut recv).await {
                        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
                        frame.extend_from_slice(&payload);
                        if send.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    Ok((addr, ca.cert_der().clone()))
}

async fn link_latency(nodes: usize, reports: usize) -> anyhow::Result<()> {
    let coordinator = production_coordinator().await;
    let (addr, pin) = (coordinator.running.quic_addr, coordinator.running.ca_hash);
    let echo_dir = tempfile::tempdir()?;
    let (echo_addr, echo_ca) = echo_server(echo_dir.path()).await?;

    // Enrollment: key generation, handshake with the CA pin, token check, durable commit, signing.
    let mut tokens = Vec::new();
    for _ in 0..nodes {
        tokens.push(coordinator.admin.token("shared", "10m").await);
    }
    let mut enroll_times = Vec::new();
    let mut creds = None;
    for (i, token) in tokens.iter().enumerate() {
        let began = Instant::now();
        let (key, req) = raw::enroll_request(token, &format!("n{i}"));
        let answer = raw::enroll(addr, pin, &req).await.map_err(anyhow::Error::msg)?;
        enroll_times.push(began.elapsed());
        if let hexa_shared::proto::EnrollResponse::Accepted(e) = answer {
            creds = Some(raw::NodeCreds::from_enrollment(&key, e));
        }
    }
    // Baseline: a fresh QUIC connection and one request/answer of the enrollment request's size.
    let mut handshake_times = Vec::new();
    let (_, sample_req) = raw::enroll_request(&tokens[0], "baseline");
    let payload = wire::encode_frame(&sample_req)?;
    for _ in 0..nodes {
        let began = Instant::now();
        let config = hexa_shared::pki::anonymous_link_client_config(&echo_ca)?;
        let mut link = raw::open_link(echo_addr, config).await.map_err(anyhow::Error::msg)?;
        link.send_bytes(&payload).await;
        wire::read_payload(&mut link.recv).await?;
        handshake_times.push(began.elapsed());
        link.conn.close(0u32.into(), b"");
    }
    let (ours, line) = summary("enrollment_latency", "hexa enrollment", enroll_times);
    println!("{line}");
    let (base, line) = summary("enrollment_latency", "baseline: QUIC connect + echo", handshake_times);
    println!("{line}");
    println!(
        "{}",
        json!({"bench": "enrollment_latency", "subject": "ratio p50", "ratio": (ours / base * 100.0).round() / 100.0})
    );

    // Report round trip on an established link: report out, ack back.
    let creds = creds.ok_or_else(|| anyhow::anyhow!("no node enrolled"))?;
    let mut link = raw::open_link(addr, creds.link_config()).await.map_err(anyhow::Error::msg)?;
    link.send(&raw::hello(&creds.name, PROTOCOL_VERSION)).await;
    let mut rtts = Vec::new();
    for seq in 1..=reports as u64 {
        let began = Instant::now();
        link.send(&sample_report(seq)).await;
        loop {
            match link.recv::<CoordinatorMessage>().await {
                Some(CoordinatorMessage::ReportAck { seq: acked }) if acked == seq => break,
                Some(_) => continue,
                None => anyhow::bail!("link closed"),
            }
        }
        rtts.push(began.elapsed());
    }
    let mut echo = raw::open_link(echo_addr, hexa_shared::pki::anonymous_link_client_config(&echo_ca)?)
        .await
        .map_err(anyhow::Error::msg)?;
    let report_frame = wire::encode_frame(&sample_report(1))?;
    let mut echo_rtts = Vec::new();
    for _ in 0..reports {
        let began = Instant::now();
        echo.send_bytes(&report_frame).await;
        wire::read_payload(&mut echo.recv).await?;
        echo_rtts.push(began.elapsed());
    }
    let (ours, line) = summary("report_round_trip", "hexa report -> ack", rtts);
    println!("{line}");
    let (base, line) = summary("report_round_trip", "baseline: QUIC echo of the same frame", echo_rtts);
    println!("{line}");
    println!(
        "{}",
        json!({"bench": "report_round_trip", "subject": "ratio p50", "ratio": (ours / base * 100.0).round() / 100.0})
    );
    coordinator.running.shutdown().await;
    Ok(())
}

/// The least a shared tenant may ask for (one replica of 100m and 128 MiB), so that placement,
/// not room, is what a benchmark measures.
fn smallest_shared_plan() -> hexa_shared::tenant::Plan {
    hexa_shared::tenant::Plan::Shared(hexa_shared::tenant::SharedPlan {
        cpu_millis: 100,
        memory_bytes: 128 << 20,
        pods: 5,
        replicas: 1,
        spread: 1,
    })
}
