//! `hexa-coordinator`: parses flags, loads the configuration and runs the coordinator until
//! SIGINT or SIGTERM; `hexa-coordinator check-config` checks the configuration and exits. A
//! configuration it refuses ends it with exit status 78 (EX_CONFIG), which the unit does not
//! restart on (`RestartPreventExitStatus=78`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use hexa_coordinator::config::{CoordinatorConfig, DEFAULT_CONFIG_PATH};

/// The Hexabase coordinator: enrolls node agents, keeps the node inventory, serves the admin API.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file [default: /etc/hexabase/coordinator.toml, if present]
    #[arg(long, value_name = "FILE", global = true)]
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the configuration (file, HEXA_* variables and flags) as a start would, and exit:
    /// 0 when the coordinator would start with it, 78 with what to change when it would refuse it
    CheckConfig,
}

/// Exit status of a refused configuration: EX_CONFIG from sysexits.h.
const EX_CONFIG: i32 = 78;

/// Exit status once another coordinator leads: EX_TEMPFAIL from sysexits.h (`Restart=on-failure`
/// starts it again, as a follower).
const EX_DEPOSED: i32 = 75;

/// Ends the process on a configuration it cannot run with, saying what to change.
fn refuse(error: impl std::fmt::Display) -> ! {
    eprintln!("hexa-coordinator: {error}");
    std::process::exit(EX_CONFIG)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    hexa_shared::install_crypto_provider();
    // The file the values come from, as errors name it.
    let file = match &args.config {
        Some(path) => path.display().to_string(),
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => DEFAULT_CONFIG_PATH.to_string(),
        None => format!("{DEFAULT_CONFIG_PATH} (absent: defaults)"),
    };
    let mut config: CoordinatorConfig =
        hexa_shared::config::load(args.config.as_deref(), DEFAULT_CONFIG_PATH.as_ref(), std::env::vars())
            .unwrap_or_else(|e| refuse(e));
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
    if let Err(e) = config.check() {
        refuse(format!("config file {file}: {e}"));
    }
    if let Some(Command::CheckConfig) = args.command {
        println!(
            "config file {file}: the coordinator would start with it (QUIC {}, admin {}, state in {})",
            config.quic_listen,
            config.admin_listen,
            config.state_dir.display()
        );
        return Ok(());
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
        tokio::select! {
            signal = hexa_shared::signals::wait_for_termination() => signal?,
            _ = running.deposed() => {
                // Another coordinator leads (or may): this one's writes are refused. It stops, and
                // its service manager starts it again as a follower.
                tracing::error!("no longer leading the coordinators: stopping, to follow");
                service.stopping("no longer leading: stopping, to follow");
                running.shutdown().await;
                std::process::exit(EX_DEPOSED);
            }
        }
        tracing::info!("shutting down");
        service.stopping("shutting down: closing agent links");
        running.shutdown().await;
        anyhow::Ok(())
    })
}
