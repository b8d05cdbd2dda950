//! What `hexactl` does around a call: asking before destructive commands, and `--wait`'s
//! progress through a tenant's phases.

use hexa_shared::tenant::Tenant;

use super::CtlError;
use super::client::Client;
use crate::inventory::NodeView;

/// Asks on the terminal whether to go on with `what`; `--yes` answers for the operator. Without a
/// terminal to ask, nothing destructive happens unasked.
pub(super) fn confirm(what: &str, yes: bool) -> Result<(), CtlError> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    let not_confirmed = || CtlError::NotConfirmed { what: what.to_string() };
    if !std::io::stdin().is_terminal() {
        return Err(not_confirmed());
    }
    eprint!("{what}? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|_| not_confirmed())?;
    match answer.trim() {
        "y" | "Y" | "yes" | "Yes" => Ok(()),
        _ => Err(not_confirmed()),
    }
}

/// One line of `--wait` progress for a tenant: its phase, and the first of its conditions that does
/// not hold yet, with why.
pub(super) fn tenant_progress(tenant: &Tenant) -> String {
    match tenant.conditions.iter().find(|c| !c.status) {
        Some(c) => format!("{}: {:?}, {:?} not yet: {} ({})", tenant.name, tenant.phase, c.kind, c.message, c.reason),
        None => format!("{}: {:?}", tenant.name, tenant.phase),
    }
}

/// `--timeout`, parsed.
pub(super) fn wait_limit(text: &str) -> Result<std::time::Duration, CtlError> {
    humantime::parse_duration(text).map_err(|e| CtlError::Usage(format!("--timeout {text:?}: {e} (e.g. 90s, 10m)")))
}

/// How often `--wait` looks.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// With `wait`, follows `tenant` until it is Ready, printing each phase it passes through; a tenant
/// that turns Degraded is reported and the wait ends with its reason.
pub(super) async fn wait_for_tenant(
    client: &Client,
    tenant: Tenant,
    wait: bool,
    limit: &std::time::Duration,
) -> Result<Tenant, CtlError> {
    use hexa_shared::tenant::Phase;
    if !wait {
        return Ok(tenant);
    }
    let started = std::time::Instant::now();
    let mut last = tenant_progress(&tenant);
    eprintln!("{last}");
    let path = format!("/v1/tenants/{}", tenant.name);
    loop {
        let now: Tenant = client.call(reqwest::Method::GET, &path, None).await?;
        let line = tenant_progress(&now);
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        match now.phase {
            Phase::Ready => return Ok(now),
            Phase::Degraded => return Err(CtlError::Usage(format!("tenant is Degraded: {last}"))),
            _ if started.elapsed() >= *limit => {
                return Err(CtlError::WaitTimedOut {
                    waited: humantime::format_duration(*limit).to_string(),
                    what: last,
                });
            }
            _ => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// Follows a deleted tenant until the coordinator no longer knows it.
pub(super) async fn wait_until_gone(
    client: &Client,
    tenant: &Tenant,
    limit: &std::time::Duration,
) -> Result<(), CtlError> {
    let started = std::time::Instant::now();
    let path = format!("/v1/tenants/{}", tenant.name);
    let mut last = tenant_progress(tenant);
    eprintln!("{last}");
    loop {
        match client.call::<Tenant>(reqwest::Method::GET, &path, None).await {
            Err(CtlError::Api { status: 404, .. }) => {
                eprintln!("{}: gone", tenant.name);
                return Ok(());
            }
            Err(e) => return Err(e),
            Ok(now) => {
                let line = tenant_progress(&now);
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        }
        if started.elapsed() >= *limit {
            return Err(CtlError::WaitTimedOut { waited: humantime::format_duration(*limit).to_string(), what: last });
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Says on standard error what a drain moved and what could not move (and why); with `wait`,
/// follows the tenants that moved until each is Ready again.
pub(super) async fn report_drain(
    client: &Client,
    before: &NodeView,
    after: &NodeView,
    wait: bool,
    limit: &std::time::Duration,
) -> Result<(), CtlError> {
    let stayed: Vec<&str> = after.tenants.iter().map(|a| a.tenant.as_str()).collect();
    let moved: Vec<&str> = before.tenants.iter().map(|a| a.tenant.as_str()).filter(|t| !stayed.contains(t)).collect();
    eprintln!(
        "node {}: {} moved off{}",
        after.name,
        moved.len(),
        if moved.is_empty() { String::new() } else { format!(": {}", moved.join(", ")) }
    );
    for tenant in &stayed {
        let view: Tenant = client.call(reqwest::Method::GET, &format!("/v1/tenants/{tenant}"), None).await?;
        eprintln!("could not move: {}", tenant_progress(&view));
    }
    if wait {
        for tenant in moved {
            let view: Tenant = client.call(reqwest::Method::GET, &format!("/v1/tenants/{tenant}"), None).await?;
            wait_for_tenant(client, view, true, limit).await?;
        }
    }
    Ok(())
}
