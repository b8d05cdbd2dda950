//! The tables `hexactl` prints.

use hexa_shared::quantity::{format_bytes, format_cpu_millis};
use hexa_shared::tenant::Tenant;

use crate::inventory::NodeView;

/// `cell` as a table shows it: control characters (a newline or an escape sequence in a
/// description, say) written as escapes, so no value can break the table or the terminal.
fn printable(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_string();
    }
    cell.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Lays out rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|row| row.iter().map(|c| printable(c)).collect()).collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out.push('\n');
    out
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string(),
    }
}

pub fn nodes_table(nodes: &[NodeView]) -> String {
    use crate::store::Health;
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            // A node not reporting shows its last report's figures, marked as such.
            let stale = if matches!(n.health, Health::Lost | Health::Unreachable) { " (stale)" } else { "" };
            let (cpu, memory, disk, load) = match (&n.capacity, &n.allocatable, &n.usage) {
                (Some(cap), Some(alloc), Some(usage)) => (
                    format!("{}/{}{stale}", format_cpu_millis(alloc.cpu_millis), format_cpu_millis(cap.cpu_millis)),
                    format!(
                        "{} free of {}{stale}",
                        format_bytes(usage.memory_available_bytes),
                        format_bytes(cap.memory_bytes)
                    ),
                    format!(
                        "{} free of {}{stale}",
                        format_bytes(usage.ephemeral_available_bytes),
                        format_bytes(cap.ephemeral_bytes)
                    ),
                    format!("{:.2}{stale}", usage.load1),
                ),
                _ => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            let booked_cpu: u64 = n.tenants.iter().map(|t| t.cpu_millis).sum();
            let booked_memory: u64 = n.tenants.iter().map(|t| t.memory_bytes).sum();
            let booked = match &n.allocatable {
                _ if n.tenants.is_empty() => "-".to_string(),
                Some(alloc) => format!(
                    "{}/{} cpu, {}/{}",
                    format_cpu_millis(booked_cpu),
                    format_cpu_millis(alloc.cpu_millis),
                    format_bytes(booked_memory),
                    format_bytes(alloc.memory_bytes)
                ),
                None => format!("{} cpu, {}", format_cpu_millis(booked_cpu), format_bytes(booked_memory)),
            };
            let health = match (n.revoked_at_unix, n.cordoned) {
                (Some(_), _) => format!("{},revoked", n.health),
                (None, true) => format!("{},cordoned", n.health),
                (None, false) => n.health.to_string(),
            };
            vec![
                n.name.clone(),
                n.pool.to_string(),
                health,
                cpu,
                memory,
                disk,
                load,
                booked,
                age(n.last_report_age_ms),
                format!("{}/{}", n.applied_generation.map_or("-".into(), |g| g.to_string()), n.spec_generation),
                match &n.k3s {
                    None | Some(hexa_shared::k3s::K3sState::NotInstalled) => "-".into(),
                    Some(hexa_shared::k3s::K3sState::Installing) => "installing".into(),
                    Some(hexa_shared::k3s::K3sState::Running { version, .. }) => version.clone(),
                    Some(hexa_shared::k3s::K3sState::Failed { .. }) => "failed".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "POOL",
            "HEALTH",
            "CPU ALLOC/CAP",
            "MEMORY",
            "EPHEMERAL",
            "LOAD",
            "BOOKED/ALLOC",
            "LAST REPORT",
            "SPEC",
            "K3S",
        ],
        &rows,
    )
}

/// A tenant's conditions with how long each has held, for `tenant get`.
pub fn conditions_table(tenant: &Tenant, now_unix_ms: u64) -> String {
    let rows: Vec<Vec<String>> = tenant
        .conditions
        .iter()
        .map(|c| {
            vec![
                format!("{:?}", c.kind),
                c.status.to_string(),
                c.reason.clone(),
                age(Some(now_unix_ms.saturating_sub(c.last_transition_unix_ms))),
                c.message.clone(),
            ]
        })
        .collect();
    table(&["CONDITION", "STATUS", "REASON", "AGE", "MESSAGE"], &rows)
}

pub fn tenants_table(tenants: &[Tenant]) -> String {
    use hexa_shared::tenant::{ConditionType, Plan};
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            let (plan, size, nodes) = match &t.plan {
                Plan::Shared(p) => (
                    "shared".to_string(),
                    format!(
                        "{} cpu, {}, {} pods, {}x{} spread",
                        format_cpu_millis(p.cpu_millis),
                        format_bytes(p.memory_bytes),
                        p.pods,
                        p.replicas,
                        p.spread
                    ),
                    t.placement.shares.iter().map(|s| s.node.clone()).collect::<Vec<_>>().join(","),
                ),
                Plan::Dedicated(p) => (
                    "dedicated".to_string(),
                    format!("{} x {}", p.count, p.node_class),
                    t.placement.dedicated_nodes.join(","),
                ),
            };
            let placed = t.condition(ConditionType::Placed);
            vec![
                t.name.clone(),
                plan,
                size,
                t.phase.to_string(),
                if nodes.is_empty() { "-".into() } else { nodes },
                placed.map_or("-".into(), |c| c.message.clone()),
            ]
        })
        .collect();
    table(&["NAME", "PLAN", "SIZE", "PHASE", "NODES", "PLACEMENT"], &rows)
}

pub(super) fn unix_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}
