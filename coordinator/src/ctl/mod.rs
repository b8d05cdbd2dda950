//! `hexactl`, the admin CLI: talks to the admin API and prints tables (or JSON with `-o json`).

//!
//! - this module: the command line (`Cli` and its commands) and [`run`], one invocation;
//! - `client`: the admin API over HTTP, its error bodies read into [`CtlError`];
//! - `tables`: what the tables print (nodes, tenants, conditions);
//! - `wait`: confirmations before destructive commands and `--wait`'s progress.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::inventory::NodeView;
use hexa_shared::tenant::Tenant;

mod client;
mod tables;
mod wait;

use client::Client;
use tables::unix_time;
pub use tables::{conditions_table, nodes_table, table, tenants_table};
use wait::{confirm, report_drain, wait_for_tenant, wait_limit, wait_until_gone};

#[derive(Parser, Debug)]
#[command(name = "hexactl", version, about = "Administer a Hexabase coordinator")]
pub struct Cli {
    /// Admin API URL
    #[arg(long, env = "HEXA_SERVER", default_value = "http://127.0.0.1:7080", global = true)]
    pub server: String,
    /// File holding the admin bearer token (ignored when HEXA_TOKEN is set)
    #[arg(long, default_value = "/var/lib/hexabase/coordinator/admin.token", global = true)]
    pub token_file: PathBuf,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Do not ask before deleting, draining or revoking (needed when standard input is not a
    /// terminal)
    #[arg(short, long, global = true)]
    pub yes: bool,
    /// Wait for a tenant create or set-plan (until Ready: its vCluster runs on the host cluster),
    /// a delete (until gone) or a node drain (until the tenants it moved are Ready), printing each
    /// phase on standard error
    #[arg(long, global = true)]
    pub wait: bool,
    /// How long --wait waits before giving up, e.g. 90s, 10m
    #[arg(long, default_value = "10m", global = true)]
    pub timeout: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List nodes with their health and live capacity
    Nodes,
    /// Show, cordon, uncordon or drain one node
    #[command(subcommand)]
    Node(NodeCommand),
    /// Bootstrap tokens for enrolling nodes
    #[command(subcommand)]
    Token(TokenCommand),
    /// Tenants (one vCluster each) and their placement
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Outstanding requests for dedicated nodes
    Provisioning,
    /// Print a completion script for a shell, e.g. `hexactl completions bash > /etc/bash_completion.d/hexactl`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Show one node
    Get { name: String },
    /// Give the node no new shares (it keeps its own)
    Cordon { name: String },
    /// Make the node schedulable again
    Uncordon { name: String },
    /// Cordon the node and move every share off it
    Drain { name: String },
    /// Delete the node: revoke its certificate (its link closes), move its shares, remove its
    /// host-cluster labels and taints, and forget it
    Delete { name: String },
    /// Revoke the node's certificate and close its link, keeping its record
    Revoke { name: String },
    /// Mint the token that enrolls this node again, as itself (its old certificate then dies)
    Reenroll {
        name: String,
        /// How long the token stays usable, e.g. 30m, 1h [default: the coordinator's token_ttl]
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant and place it
    Create {
        name: String,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Show one tenant with its conditions and placement
    Get { name: String },
    /// List tenants
    List,
    /// Resize a tenant, or move it between the shared and dedicated plans
    SetPlan {
        name: String,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Delete a tenant and free everything it held
    Delete { name: String },
}

#[derive(clap::Args, Debug, Default)]
pub struct PlanArgs {
    /// shared (many tenants per node) or dedicated (whole nodes) [default: the tenant's current
    /// plan, or shared for a new tenant]
    #[arg(long)]
    pub plan: Option<String>,
    /// Shared: CPU quota, e.g. 2 or 500m
    #[arg(long)]
    pub cpu: Option<String>,
    /// Shared: memory quota, e.g. 4Gi
    #[arg(long)]
    pub memory: Option<String>,
    /// Shared: pod quota [default: 100 for a new tenant]
    #[arg(long)]
    pub pods: Option<u32>,
    /// Shared: vCluster control-plane replicas, 1 or 3 [default: 1 for a new tenant]
    #[arg(long)]
    pub replicas: Option<u8>,
    /// Shared: nodes the quota is spread over [default: 1 for a new tenant]
    #[arg(long)]
    pub spread: Option<u32>,
    /// Dedicated: node class (S, M, L by default)
    #[arg(long)]
    pub class: Option<String>,
    /// Dedicated: number of nodes [default: 1 for a new tenant]
    #[arg(long)]
    pub count: Option<u32>,
}

impl PlanArgs {
    /// The plan as the API takes it, for a new tenant; mistakes are reported before anything is sent.
    pub fn to_plan(&self) -> Result<hexa_shared::tenant::Plan, CtlError> {
        self.over(None)
    }

    /// The plan these flags make of `current`: a flag left out keeps the current value (a tenant
    /// with 3 replicas keeps them when only its quota changes); for a new tenant (`None`) the
    /// documented defaults apply. A flag of the other kind of plan is an error, not ignored.
    pub fn over(&self, current: Option<&hexa_shared::tenant::Plan>) -> Result<hexa_shared::tenant::Plan, CtlError> {
        use hexa_shared::tenant::{DedicatedPlan, Plan, SharedPlan};
        let usage = |m: String| CtlError::Usage(m);
        let kind = match (self.plan.as_deref(), current) {
            (Some(kind), _) => kind,
            (None, Some(current)) => current.kind(),
            (None, None) => "shared",
        };
        match kind {
            "shared" => {
                let stray: Vec<&str> = [(self.class.is_some(), "--class"), (self.count.is_some(), "--count")]
                    .into_iter()
                    .filter_map(|(set, flag)| set.then_some(flag))
                    .collect();
                if !stray.is_empty() {
                    return Err(usage(format!(
                        "{} apply to the dedicated plan only; add --plan dedicated to move the tenant to whole nodes",
                        stray.join(" and ")
                    )));
                }
                let now = match current {
                    Some(Plan::Shared(now)) => Some(now),
                    _ => None,
                };
                let cpu_millis = match (self.cpu.as_deref(), now) {
                    (Some(cpu), _) => hexa_shared::quantity::parse_cpu_millis(cpu).map_err(|e| usage(e.to_string()))?,
                    (None, Some(now)) => now.cpu_millis,
                    (None, None) => return Err(usage("a shared plan needs --cpu (e.g. --cpu 2)".into())),
                };
                let memory_bytes = match (self.memory.as_deref(), now) {
                    (Some(memory), _) => {
                        hexa_shared::quantity::parse_bytes(memory).map_err(|e| usage(e.to_string()))?
                    }
                    (None, Some(now)) => now.memory_bytes,
                    (None, None) => return Err(usage("a shared plan needs --memory (e.g. --memory 4Gi)".into())),
                };
                Ok(Plan::Shared(SharedPlan {
                    cpu_millis,
                    memory_bytes,
                    pods: self.pods.or(now.map(|n| n.pods)).unwrap_or(100),
                    replicas: self.replicas.or(now.map(|n| n.replicas)).unwrap_or(1),
                    spread: self.spread.or(now.map(|n| n.spread)).unwrap_or(1),
                }))
            }
            "dedicated" => {
                let stray: Vec<&str> = [
                    (self.cpu.is_some(), "--cpu"),
                    (self.memory.is_some(), "--memory"),
                    (self.pods.is_some(), "--pods"),
                    (self.replicas.is_some(), "--replicas"),
                    (self.spread.is_some(), "--spread"),
                ]
                .into_iter()
                .filter_map(|(set, flag)| set.then_some(flag))
                .collect();
                if !stray.is_empty() {
                    return Err(usage(format!(
                        "{} apply to the shared plan only; a dedicated plan is --class and --count",
                        stray.join(", ")
                    )));
                }
                let now = match current {
                    Some(Plan::Dedicated(now)) => Some(now),
                    _ => None,
                };
                let node_class = match (self.class.clone(), now) {
                    (Some(class), _) => class,
                    (None, Some(now)) => now.node_class.clone(),
                    (None, None) => return Err(usage("a dedicated plan needs --class (e.g. --class M)".into())),
                };
                Ok(Plan::Dedicated(DedicatedPlan {
                    node_class,
                    count: self.count.or(now.map(|n| n.count)).unwrap_or(1),
                }))
            }
            other => Err(usage(format!("unknown plan {other:?}: use shared or dedicated"))),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint a single-use token; prints it once
    Create {
        /// Pool the node joins: server, shared or dedicated:<tenant>
        #[arg(long)]
        pool: String,
        /// Lifetime, e.g. 30m or 1h (default: the coordinator's token_ttl)
        #[arg(long)]
        ttl: Option<String>,
        /// Free text shown in listings
        #[arg(long, default_value = "")]
        description: String,
        /// For dedicated:<tenant> pools: the class of the node being admitted
        #[arg(long)]
        class: Option<String>,
    },
    /// List tokens (never their secrets)
    List {
        /// Only tokens that can still enroll a node (hide used, revoked and expired ones)
        #[arg(long)]
        active: bool,
    },
    /// Revoke an unused token
    Revoke { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot read the admin token from {path}: {source} (set HEXA_TOKEN or --token-file)")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("cannot reach the coordinator at {server}: {source} (is it running? set --server or HEXA_SERVER)")]
    Unreachable { server: String, source: reqwest::Error },
    #[error("{message} (HTTP {status} {code})")]
    Api { status: u16, code: String, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(String),
    #[error("{0}")]
    Usage(String),
    #[error("{what}: not confirmed (answer y, or pass --yes)")]
    NotConfirmed { what: String },
    #[error("gave up waiting after {waited}: {what} (see `hexactl tenant get` or `hexactl node get`)")]
    WaitTimedOut { waited: String, what: String },
}

/// The completion script of `hexactl` for `shell`.
pub fn completions(shell: clap_complete::Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "hexactl", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// Runs one `hexactl` invocation and returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CtlError> {
    // Completions need no coordinator and no token.
    if let Command::Completions { shell } = cli.command {
        return Ok(completions(shell));
    }
    let token = match std::env::var("HEXA_TOKEN") {
        Ok(token) if !token.trim().is_empty() => token.trim().to_string(),
        _ => std::fs::read_to_string(&cli.token_file)
            .map_err(|source| CtlError::Token { path: cli.token_file.clone(), source })?
            .trim()
            .to_string(),
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|source| CtlError::Unreachable { server: cli.server.clone(), source })?;
    let client = Client { http, server: cli.server.clone(), token };
    let json_out = cli.output == Output::Json;
    let pretty = |v: &serde_json::Value| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    use reqwest::Method;
    Ok(match cli.command {
        Command::Nodes => {
            let nodes: Vec<NodeView> = client.call(Method::GET, "/v1/nodes", None).await?;
            if json_out { pretty(&json!(nodes)) } else { nodes_table(&nodes) }
        }
        Command::Node(NodeCommand::Reenroll { name, ttl }) => {
            let path = format!("/v1/nodes/{name}/reenroll");
            let created: serde_json::Value = client.call(Method::POST, &path, Some(json!({"ttl": ttl}))).await?;
            if json_out {
                pretty(&created)
            } else {
                eprintln!(
                    "re-enrollment token {} for node {name} expires {}; it is shown only now",
                    created["id"].as_str().unwrap_or_default(),
                    created["expires_at_unix"]
                );
                format!("{}\n", created["token"].as_str().unwrap_or_default())
            }
        }
        Command::Node(command) => {
            match &command {
                NodeCommand::Drain { name } => {
                    confirm(&format!("Drain node {name} (no new shares; every share moved off it)"), cli.yes)?
                }
                NodeCommand::Delete { name } => confirm(
                    &format!("Delete node {name} (certificate revoked, shares moved off, record forgotten)"),
                    cli.yes,
                )?,
                NodeCommand::Revoke { name } => {
                    confirm(&format!("Revoke node {name}'s certificate (its link closes now)"), cli.yes)?
                }
                _ => {}
            }
            let before: Option<NodeView> = match &command {
                NodeCommand::Drain { name } => {
                    Some(client.call(Method::GET, &format!("/v1/nodes/{name}"), None).await?)
                }
                _ => None,
            };
            let (method, path) = match &command {
                NodeCommand::Get { name } => (Method::GET, format!("/v1/nodes/{name}")),
                NodeCommand::Cordon { name } => (Method::POST, format!("/v1/nodes/{name}/cordon")),
                NodeCommand::Uncordon { name } => (Method::POST, format!("/v1/nodes/{name}/uncordon")),
                NodeCommand::Drain { name } => (Method::POST, format!("/v1/nodes/{name}/drain")),
                NodeCommand::Delete { name } => (Method::DELETE, format!("/v1/nodes/{name}")),
                NodeCommand::Revoke { name } => (Method::POST, format!("/v1/nodes/{name}/revoke")),
                NodeCommand::Reenroll { .. } => unreachable!("handled above"),
            };
            let node: NodeView = client.call(method, &path, None).await?;
            if let Some(before) = before {
                report_drain(&client, &before, &node, cli.wait, &wait_limit(&cli.timeout)?).await?;
            }
            if json_out { pretty(&json!(node)) } else { nodes_table(std::slice::from_ref(&node)) }
        }
        Command::Tenant(command) => {
            // Commands about one tenant print that tenant: an object in JSON, not a list of one.
            let one = !matches!(command, TenantCommand::List);
            let tenants: Vec<Tenant> = match command {
                TenantCommand::List => client.call(Method::GET, "/v1/tenants", None).await?,
                TenantCommand::Get { name } => {
                    vec![client.call(Method::GET, &format!("/v1/tenants/{name}"), None).await?]
                }
                TenantCommand::Create { name, plan } => {
                    let body = json!({"name": name, "plan": plan.to_plan()?});
                    let created: Tenant = client.call(Method::POST, "/v1/tenants", Some(body)).await?;
                    vec![wait_for_tenant(&client, created, cli.wait, &wait_limit(&cli.timeout)?).await?]
                }
                TenantCommand::SetPlan { name, plan } => {
                    let current: Tenant = client.call(Method::GET, &format!("/v1/tenants/{name}"), None).await?;
                    let body = json!({"plan": plan.over(Some(&current.plan))?});
                    let changed: Tenant =
                        client.call(Method::PATCH, &format!("/v1/tenants/{name}"), Some(body)).await?;
                    vec![wait_for_tenant(&client, changed, cli.wait, &wait_limit(&cli.timeout)?).await?]
                }
                TenantCommand::Delete { name } => {
                    confirm(&format!("Delete tenant {name} and everything it holds"), cli.yes)?;
                    let deleting: Tenant = client.call(Method::DELETE, &format!("/v1/tenants/{name}"), None).await?;
                    if cli.wait {
                        wait_until_gone(&client, &deleting, &wait_limit(&cli.timeout)?).await?;
                    }
                    vec![deleting]
                }
            };
            match (json_out, one, tenants.first()) {
                (true, true, Some(tenant)) => pretty(&json!(tenant)),
                (true, _, _) => pretty(&json!(tenants)),
                (false, true, Some(tenant)) => {
                    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
                    format!("{}\n{}", tenants_table(&tenants), conditions_table(tenant, now_ms))
                }
                (false, _, _) => tenants_table(&tenants),
            }
        }
        Command::Completions { shell } => completions(shell),
        Command::Provisioning => {
            let requests: Vec<serde_json::Value> = client.call(Method::GET, "/v1/provisioning", None).await?;
            if json_out {
                pretty(&json!(requests))
            } else {
                let rows: Vec<Vec<String>> = requests
                    .iter()
                    .map(|r| {
                        vec![
                            r["tenant"].as_str().unwrap_or("-").to_string(),
                            r["node_class"].as_str().unwrap_or("-").to_string(),
                            r["count"].to_string(),
                        ]
                    })
                    .collect();
                let text = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".to_string(),
                    other => other.to_string(),
                };
                let vms: Vec<Vec<String>> = requests
                    .iter()
                    .flat_map(|r| r["vms"].as_array().cloned().unwrap_or_default())
                    .map(|vm| {
                        vec![
                            text(&vm["tenant"]),
                            text(&vm["record"]),
                            text(&vm["state"]),
                            humantime::format_duration(std::time::Duration::from_secs(
                                vm["age_seconds"].as_u64().unwrap_or(0),
                            ))
                            .to_string(),
                            text(&vm["proxmox_node"]),
                            text(&vm["vmid"]),
                            text(&vm["last_error"]),
                        ]
                    })
                    .collect();
                let failures: Vec<Vec<String>> = requests
                    .iter()
                    .flat_map(|r| r["failures"].as_array().cloned().unwrap_or_default())
                    .map(|f| {
                        vec![
                            text(&f["tenant"]),
                            text(&f["record"]),
                            text(&f["vmid"]),
                            text(&f["state"]),
                            text(&f["reason"]),
                        ]
                    })
                    .collect();
                let mut out = table(&["TENANT", "CLASS", "NODES"], &rows);
                if !vms.is_empty() {
                    out.push('\n');
                    out.push_str(&table(&["TENANT", "VM", "STATE", "AGE", "PROXMOX NODE", "VMID", "LAST ERROR"], &vms));
                }
                if !failures.is_empty() {
                    out.push_str("\nDestroyed and replaced (last day):\n");
                    out.push_str(&table(&["TENANT", "VM", "VMID", "FAILED IN", "REASON"], &failures));
                }
                out
            }
        }
        Command::Token(TokenCommand::Create { pool, ttl, description, class }) => {
            let created: serde_json::Value = client
                .call(
                    Method::POST,
                    "/v1/tokens",
                    Some(json!({"pool": pool, "ttl": ttl, "description": description, "node_class": class})),
                )
                .await?;
            if json_out {
                pretty(&created)
            } else {
                // Like `kubeadm token create`: the token alone on stdout, ready for a script.
                eprintln!(
                    "token {} for pool {} expires {}; it is shown only now",
                    created["id"].as_str().unwrap_or_default(),
                    created["pool"].as_str().unwrap_or_default(),
                    unix_time(created["expires_at_unix"].as_i64().unwrap_or_default())
                );
                format!("{}\n", created["token"].as_str().unwrap_or_default())
            }
        }
        Command::Token(TokenCommand::List { active }) => {
            let mut tokens: Vec<serde_json::Value> = client.call(Method::GET, "/v1/tokens", None).await?;
            if active {
                tokens.retain(|t| t["status"] == "active");
            }
            if json_out {
                pretty(&json!(tokens))
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        let s = |k: &str| t[k].as_str().unwrap_or("-").to_string();
                        vec![
                            s("id"),
                            s("pool"),
                            s("status"),
                            t["used_by"].as_str().unwrap_or("-").to_string(),
                            unix_time(t["expires_at_unix"].as_i64().unwrap_or_default()),
                            s("description"),
                        ]
                    })
                    .collect();
                table(&["ID", "POOL", "STATUS", "USED BY", "EXPIRES", "DESCRIPTION"], &rows)
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let revoked: serde_json::Value = client.call(Method::DELETE, &format!("/v1/tokens/{id}"), None).await?;
            if json_out { pretty(&revoked) } else { format!("token {id} revoked\n") }
        }
    })
}

#[cfg(test)]
mod tests;
