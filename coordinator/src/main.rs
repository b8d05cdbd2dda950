//! `hexa-coordinator`: parses flags, loads the configuration and runs the coordinator until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use hexa_coordinator::config::{CoordinatorConfig, DEFAULT_CONFIG_PATH};

/// The Hexabase coordinator: enrolls node agents, keeps the node inventory, serves the admin API.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file [default: /etc/hexabase/coordinator.toml, if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the CA, admin token and state database (config: state_dir)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// UDP address for agent connections (config: quic_listen)
    #[arg(long, value_name = "ADDR")]
    quic_listen: Option<SocketAddr>,
    /// TCP address for the admin API (config: admin_listen)
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Log format: text or json (config: log_format)
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<hexa_shared::logging::LogFormat>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    hexa_shared::install_crypto_provider();
    let mut config: CoordinatorConfig =
        hexa_shared::config::load(args.config.as_deref(), DEFAULT_CONFIG_PATH.as_ref(), std::env::vars())?;
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(addr) = args.quic_listen {
        config.quic_listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        config.admin_listen = addr;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    hexa_shared::logging::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async {
        let service = hexa_shared::service::ServiceManager::from_env();
        let running = hexa_coordinator::start_notifying(config, service.clone()).await?;
        // stdout carries what an operator copies: the CA pin agents need and where the admin token is.
        println!("CA {}", running.ca_hash);
        println!("admin token: {}", running.admin_token_path.display());
        println!("QUIC {} admin http://{}", running.quic_addr, running.admin_addr);
        // The store is open and both listeners are bound: agents and operators can be served.
        service.ready(&format!("serving agents on {}/udp, admin API on {}", running.quic_addr, running.admin_addr));
        hexa_shared::signals::wait_for_termination().await?;
        tracing::info!("shutting down");
        service.stopping("shutting down: closing agent links");
        running.shutdown().await;
        anyhow::Ok(())
    })
}
