//! `hexa-bench proxmox`: dedicated tenants provisioned on the Proxmox VE emulator with realistic
//! task times, from request to every tenant Ready. The coordinator provisions every VM at once
//! (one step in flight per VM) and, in the same run, one step at a time across all VMs
//! (`max_in_flight = 1`) as the baseline; each run prints a JSON line with the wall time and the
//! Proxmox API calls per VM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::dedicated::Env;
use crate::pve::Timings;

/// Scales every task time of the realistic timings by `scale`.
fn scaled(scale: f64) -> Timings {
    let t = Timings::realistic();
    let s = |d: Duration| d.mul_f64(scale);
    Timings {
        clone_full: s(t.clone_full),
        clone_linked: s(t.clone_linked),
        config: s(t.config),
        resize: s(t.resize),
        start: s(t.start),
        shutdown: s(t.shutdown),
        stop: s(t.stop),
        destroy: s(t.destroy),
        listed_after: s(t.listed_after),
        clone_contention: t.clone_contention,
    }
}

/// One run: `tenants` dedicated tenants of `vms / tenants` S nodes each, all requested at once.
async fn run(vms: usize, tenants: usize, scale: f64, max_in_flight: usize) -> anyhow::Result<serde_json::Value> {
    let per_tenant = vms.div_ceil(tenants);
    crate::init();
    let pve = crate::pve::Pve::start(scaled(scale), &crate::dedicated::TEMPLATES).await;
    let env = Env::start_configured(pve, |config| {
        // The product's default health thresholds: twenty agents share this machine.
        config.report_interval = Duration::from_secs(1);
        config.unreachable_after = Duration::from_secs(3);
        config.lost_after = Duration::from_secs(30);
        if let Some(s) = config.proxmox.as_mut() {
            s.max_in_flight = max_in_flight;
            s.task_poll = Duration::from_millis(500);
            s.registration_timeout = Duration::from_secs(600);
            s.task_timeout = Duration::from_secs(600);
        }
    })
    .await;
    let names: Vec<String> = (0..tenants).map(|i| format!("bench-{i}")).collect();
    let started = Instant::now();
    for name in &names {
        env.create(name, json!({"kind": "dedicated", "node_class": "S", "count": per_tenant})).await;
    }
    let mut ready = std::collections::BTreeSet::new();
    let mut first_ready = None;
    while ready.len() < names.len() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "not all tenants Ready within an hour");
        for name in &names {
            if ready.contains(name) {
                continue;
            }
            // The helm-controller and the StatefulSet finish as soon as the chart is applied.
            let job = format!("helm-install-vcluster-{name}");
            if env.kube.object("jobs", "kube-system", &job).is_some() {
                let _ = env.kube.complete_job("kube-system", &job);
                let _ = env.kube.make_statefulset_ready(&format!("hx-{name}"), &format!("vcluster-{name}"));
            }
            if env.tenant(name).await.is_some_and(|t| t.phase == hexa_shared::tenant::Phase::Ready) {
                ready.insert(name.clone());
                first_ready.get_or_insert(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let calls = env.pve.requests();
    let clones = env.pve.clones().len();
    env.stop().await;
    Ok(json!({
        "bench": "proxmox",
        "mode": if max_in_flight == 0 { "concurrent" } else { "one_at_a_time" },
        "vms": tenants * per_tenant,
        "tenants": tenants,
        "task_time_scale": scale,
        "seconds_to_all_ready": seconds,
        "seconds_to_first_ready": first_ready.map(|d| d.as_secs_f64()),
        "proxmox_calls": calls,
        "proxmox_calls_per_vm": calls as f64 / (tenants * per_tenant) as f64,
        "clones": clones,
    }))
}

pub async fn proxmox(vms: usize, tenants: usize, scale: f64) -> anyhow::Result<()> {
    anyhow::ensure!(tenants > 0 && vms >= tenants, "need at least one VM per tenant");
    let concurrent = run(vms, tenants, scale, 0).await?;
    println!("{concurrent}");
    let baseline = run(vms, tenants, scale, 1).await?;
    println!("{baseline}");
    let ratio = baseline["seconds_to_all_ready"].as_f64().unwrap_or(0.0)
        / concurrent["seconds_to_all_ready"].as_f64().unwrap_or(f64::INFINITY);
    println!("{}", json!({"bench": "proxmox", "speedup_vs_one_at_a_time": ratio}));
    Ok(())
}
