//! `hexactl`, the admin CLI: talks to the admin API and prints tables (or JSON with `-o json`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde_json::json;

use hexa_shared::quantity::{format_bytes, format_cpu_millis};

use crate::inventory::NodeView;

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
    /// Show one node
    Node { name: String },
    /// Bootstrap tokens for enrolling nodes
    #[command(subcommand)]
    Token(TokenCommand),
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
    },
    /// List tokens (never their secrets)
    List,
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
}

struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Client {
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CtlError> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let unreachable = |source| CtlError::Unreachable { server: self.server.clone(), source };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let field = |name: &str| parsed["error"][name].as_str().map(str::to_string);
            return Err(CtlError::Api {
                status: status.as_u16(),
                code: field("code").unwrap_or_default(),
                message: field("message").unwrap_or(text),
            });
        }
        serde_json::from_str(&text).map_err(|e| CtlError::Decode(e.to_string()))
    }
}

/// Lays out rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let (cpu, memory, disk, load) = match (&n.capacity, &n.allocatable, &n.usage) {
                (Some(cap), Some(alloc), Some(usage)) => (
                    format!("{}/{}", format_cpu_millis(alloc.cpu_millis), format_cpu_millis(cap.cpu_millis)),
                    format!(
                        "{} free of {}",
                        format_bytes(usage.memory_available_bytes),
                        format_bytes(cap.memory_bytes)
                    ),
                    format!(
                        "{} free of {}",
                        format_bytes(usage.ephemeral_available_bytes),
                        format_bytes(cap.ephemeral_bytes)
                    ),
                    format!("{:.2}", usage.load1),
                ),
                _ => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            vec![
                n.name.clone(),
                n.pool.to_string(),
                n.health.to_string(),
                cpu,
                memory,
                disk,
                load,
                age(n.last_report_age_ms),
                format!("{}/{}", n.applied_generation.map_or("-".into(), |g| g.to_string()), n.spec_generation),
            ]
        })
        .collect();
    table(&["NAME", "POOL", "HEALTH", "CPU ALLOC/CAP", "MEMORY", "EPHEMERAL", "LOAD", "LAST REPORT", "SPEC"], &rows)
}

fn unix_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// Runs one `hexactl` invocation and returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CtlError> {
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
        Command::Node { name } => {
            let node: NodeView = client.call(Method::GET, &format!("/v1/nodes/{name}"), None).await?;
            if json_out { pretty(&json!(node)) } else { nodes_table(std::slice::from_ref(&node)) }
        }
        Command::Token(TokenCommand::Create { pool, ttl, description }) => {
            let created: serde_json::Value = client
                .call(Method::POST, "/v1/tokens", Some(json!({"pool": pool, "ttl": ttl, "description": description})))
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
        Command::Token(TokenCommand::List) => {
            let tokens: Vec<serde_json::Value> = client.call(Method::GET, "/v1/tokens", None).await?;
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
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(out, "A    LONG\nxyz  1\nq    22\n");
    }
}
