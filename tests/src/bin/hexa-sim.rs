//! `hexa-sim`: many simulated agents in one process against a running coordinator.
//!
//! Each agent gets a bootstrap token of its own from the admin API, enrolls with it, and then
//! reports every interval the coordinator asks for, acknowledging every spec it is sent (see
//! `hexa_tests::sim`). Commands on stdin, one per line, act on agents chosen by index (`7`),
//! range (`10-19`), name (`sim-00007`) or `all`:
//!
//! - `kill SEL`: end the agents at once, as `kill -9` would;
//! - `revive SEL`: start them again with their credentials;
//! - `partition SEL [stop|drop]`: stop them sending (default), or drop every packet of their
//!   endpoints (which cuts every agent behind the same endpoint);
//! - `heal SEL`: undo partitions;
//! - `status`: print a status line now; `quit`: stop every agent and exit.
//!
//! A status line (JSON) goes to stdout every `--status-every` and after every command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use hexa_tests::admin::AdminClient;
use hexa_tests::sim::{Fleet, FleetConfig, Partition};

#[derive(Parser, Debug)]
#[command(about = "Simulated hexa-agents against a running coordinator")]
struct Args {
    /// The coordinator's QUIC address
    #[arg(long, default_value = "127.0.0.1:7443")]
    coordinator: SocketAddr,
    /// The coordinator CA's hash, sha256:<hex>, as it printed it at its first start
    #[arg(long)]
    ca_hash: String,
    /// The coordinator's admin API, where the tokens are minted
    #[arg(long, default_value = "http://127.0.0.1:7080")]
    admin: String,
    /// File holding the admin token
    #[arg(long, default_value = "/var/lib/hexabase/coordinator/admin.token")]
    admin_token_file: PathBuf,
    /// How many agents to simulate
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Client endpoints (UDP sockets, each on its own loopback address) the agents share;
    /// default: one per 20 agents
    #[arg(long)]
    endpoints: Option<usize>,
    /// The pool the agents' tokens are for
    #[arg(long, default_value = "shared")]
    pool: String,
    /// Pods each agent reports
    #[arg(long, default_value_t = 8)]
    pods: usize,
    /// Agents are named <prefix>-00000, <prefix>-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Enrollments in flight at once
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How often a status line is printed
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    status_every: Duration,
}

fn main() -> anyhow::Result<()> {
    hexa_shared::install_crypto_provider();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&args.admin_token_file)
        .with_context(|| format!("cannot read the admin token from {}", args.admin_token_file.display()))?;
    let admin = AdminClient::new(args.admin.trim_end_matches('/').to_string(), token.trim().to_string());
    let mut tokens = Vec::with_capacity(args.agents);
    for _ in 0..args.agents {
        tokens.push(admin.token(&args.pool, "1h").await);
    }
    let config = FleetConfig {
        coordinator: args.coordinator,
        ca_hash: args.ca_hash.parse().context("--ca-hash")?,
        endpoints: args.endpoints.unwrap_or(args.agents.div_ceil(20)).max(1),
        pods_per_agent: args.pods,
        prefix: args.prefix.clone(),
        seed: 1,
    };
    let mut fleet = Fleet::new(&config)?;
    let began = std::time::Instant::now();
    fleet.enroll(tokens, args.concurrency).await?;
    println!("{}", json!({"event": "enrolled", "agents": fleet.len(), "seconds": began.elapsed().as_secs_f64()}));
    fleet.start_all();

    // Commands are read on a thread of their own (stdin blocks) and passed on in order.
    let (line_tx, mut lines) = tokio::sync::mpsc::channel::<String>(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut status = tokio::time::interval(args.status_every);
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = status.tick() => print_status(&fleet),
            line = lines.recv(), if stdin_open => match line {
                Some(line) => {
                    match command(&fleet, line.trim()) {
                        Ok(Command::Quit) => break,
                        Ok(Command::Done) => {}
                        Err(e) => println!("{}", json!({"event": "error", "command": line.trim(), "error": e})),
                    }
                    print_status(&fleet);
                }
                // Without a stdin the fleet runs until interrupted.
                None => stdin_open = false,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    fleet.shutdown().await;
    Ok(())
}

enum Command {
    Done,
    Quit,
}

/// The agents `selector` names.
fn select(fleet: &Fleet, selector: &str) -> Result<Vec<usize>, String> {
    if selector == "all" {
        return Ok((0..fleet.len()).collect());
    }
    if let Some((a, b)) = selector.split_once('-').filter(|(a, _)| a.parse::<usize>().is_ok()) {
        let (a, b) = (a.parse::<usize>().map_err(|e| e.to_string())?, b.parse::<usize>().map_err(|e| e.to_string())?);
        if a > b || b >= fleet.len() {
            return Err(format!("range {selector} is not within 0-{}", fleet.len().saturating_sub(1)));
        }
        return Ok((a..=b).collect());
    }
    if let Ok(i) = selector.parse::<usize>() {
        return if i < fleet.len() { Ok(vec![i]) } else { Err(format!("no agent {i}: there are {}", fleet.len())) };
    }
    fleet
        .names()
        .iter()
        .position(|n| n == selector)
        .map(|i| vec![i])
        .ok_or_else(|| format!("no agent named {selector}: give an index, a range a-b, a name or all"))
}

fn command(fleet: &Fleet, line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] | ["status"] => {}
        ["quit"] | ["exit"] => return Ok(Command::Quit),
        ["kill", sel] => select(fleet, sel)?.into_iter().for_each(|i| fleet.kill(i)),
        ["revive", sel] => select(fleet, sel)?.into_iter().for_each(|i| fleet.revive(i)),
        ["heal", sel] => select(fleet, sel)?.into_iter().for_each(|i| fleet.heal(i)),
        ["partition", sel, rest @ ..] => {
            let how = match rest {
                [] | ["stop"] => Partition::StopSending,
                ["drop"] => Partition::DropPackets,
                _ => return Err("partition takes stop (the default) or drop".into()),
            };
            select(fleet, sel)?.into_iter().for_each(|i| fleet.partition(i, how));
        }
        _ => {
            return Err(
                "unknown command: kill|revive|heal SEL, partition SEL [stop|drop], status, quit (SEL: 7, 10-19, a name, all)"
                    .into(),
            );
        }
    }
    Ok(Command::Done)
}

fn print_status(fleet: &Fleet) {
    let stats = fleet.stats();
    let latencies = stats.take_latencies();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).map(|us| f64::from(*us) / 1000.0);
    println!(
        "{}",
        json!({
            "event": "status",
            "agents": fleet.len(),
            "linked": fleet.linked_count(),
            "reports_sent": stats.reports_sent.load(Ordering::Relaxed),
            "reports_acked": stats.reports_acked.load(Ordering::Relaxed),
            "specs_applied": stats.specs_applied.load(Ordering::Relaxed),
            "sessions_opened": stats.sessions_opened.load(Ordering::Relaxed),
            "session_failures": stats.session_failures.load(Ordering::Relaxed),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
        })
    );
}
