//! Benchmarks of what strangers cost the coordinator (`hexa-bench hostile-enroll`,
//! `hexa-bench slow-headers`): each runs the real `hexa-coordinator` process with and without the
//! hostile load in the same run and prints one JSON line per run.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::hostile;
use crate::procs::CoordinatorProc;

async fn all_ready(c: &CoordinatorProc, prefix: &str, count: usize, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let ready = c
            .admin
            .nodes()
            .await
            .iter()
            .filter(|n| n.name.starts_with(prefix) && n.health == hexa_coordinator::store::Health::Ready)
            .count();
        if ready == count {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < within, "only {ready} of {count} agents Ready after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `honest` agents enroll and report, first alone, then beside `peers` hostile enrollment
/// connections (half a length prefix then silence, half 1 MiB bodies): the coordinator's peak
/// resident memory and the time until every honest agent is Ready, for both.
pub async fn hostile_enroll(peers: usize, honest: usize) -> anyhow::Result<()> {
    let mut peaks = Vec::new();
    for flood in [false, true] {
        let dir = tempfile::tempdir()?;
        let c = CoordinatorProc::start(dir.path(), crate::free_port(), crate::free_port(), "coordinator.log").await;
        let mut tokens = Vec::new();
        for _ in 0..honest {
            tokens.push(c.admin.token("shared", "10m").await);
        }
        let started = Instant::now();
        let attack = flood
            .then(|| tokio::spawn(hostile::enrollment_flood(c.quic_addr, c.ca_hash, peers, Duration::from_secs(30))));
        let agents: Vec<crate::inproc::Agent> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| {
                crate::inproc::Agent::spawn(hexa_agent::config::AgentConfig {
                    coordinator: c.quic_addr.to_string(),
                    token,
                    ca_hash: c.ca_hash.to_string(),
                    state_dir: dir.path().join(format!("honest-{i}")),
                    node_name: format!("honest-{i}"),
                    ephemeral_path: dir.path().to_path_buf(),
                    ..Default::default()
                })
            })
            .collect();
        all_ready(&c, "honest-", honest, Duration::from_secs(180)).await?;
        let ready_after = started.elapsed();
        let outcome = match attack {
            Some(attack) => Some(attack.await?),
            None => None,
        };
        // Let the honest links report for a while, as they would in service.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peak = hostile::peak_rss_mib(c.proc.pid());
        peaks.push(peak);
        let load = std::sync::atomic::Ordering::Relaxed;
        println!(
            "{}",
            json!({
                "bench": "hostile_enroll",
                "subject": if flood { "with_flood" } else { "honest_only" },
                "honest_agents": honest,
                "hostile_connections": if flood { peers } else { 0 },
                "hostile_admitted": outcome.as_ref().map(|o| o.admitted.load(load)),
                "hostile_refused": outcome.as_ref().map(|o| o.refused.load(load)),
                "all_honest_ready_s": (ready_after.as_secs_f64() * 10.0).round() / 10.0,
                "coordinator_peak_rss_mib": (peak * 10.0).round() / 10.0,
            })
        );
        for agent in agents {
            agent.stop().await;
        }
    }
    println!(
        "{}",
        json!({"bench": "hostile_enroll", "peak_rss_delta_mib": ((peaks[1] - peaks[0]) * 10.0).round() / 10.0})
    );
    Ok(())
}

/// `/healthz` latency on the admin port, alone and beside `slow` connections that send half a
/// request's headers and then nothing.
pub async fn slow_headers(slow: usize, requests: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let admin_port = crate::free_port();
    let _c = CoordinatorProc::start(dir.path(), crate::free_port(), admin_port, "coordinator.log").await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let mut held = Vec::new();
    for subject in ["alone", "beside_slow_headers"] {
        if subject == "beside_slow_headers" {
            held = hostile::slow_header_connections(addr, slow).await;
        }
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            let started = Instant::now();
            let status = http.get(format!("http://{addr}/healthz")).send().await?.status();
            anyhow::ensure!(status == 200, "healthz answered {status}");
            samples.push(started.elapsed());
        }
        samples.sort();
        let ms = |p: f64| {
            let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
            (samples[i].as_secs_f64() * 1e5).round() / 100.0
        };
        println!(
            "{}",
            json!({"bench": "slow_headers", "subject": subject, "slow_connections": held.len(),
                   "requests": requests, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0)})
        );
    }
    Ok(())
}
