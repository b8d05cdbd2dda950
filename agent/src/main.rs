//! `hexa-agent`: parses flags, loads the configuration and runs the agent until SIGINT/SIGTERM;
//! `hexa-agent apply --spec FILE` applies one spec and exits; `hexa-agent check-config` checks the
//! configuration and exits. A configuration the agent refuses ends it with exit status 78
//! (EX_CONFIG), which the unit does not restart on (`RestartPreventExitStatus=78`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use hexa_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};

/// The Hexabase node agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file [default: /etc/hexabase/agent.toml, if present]
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Coordinator QUIC address (config: coordinator)
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// Bootstrap token for the first enrollment (config: token); visible to every local user in
    /// /proc, so prefer --token-file
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// File holding the bootstrap token (config: token_file)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Coordinator CA pin, sha256:<hex> (config: ca_hash)
    #[arg(long, value_name = "sha256:<hex>")]
    ca_hash: Option<String>,
    /// State directory (config: state_dir)
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Node name to ask for at enrollment (config: node_name)
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Log format: text or json (config: log_format)
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<hexa_shared::logging::LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the configuration (file, HEXA_* variables and flags) as a start would, and exit:
    /// 0 when the agent would start with it, 78 with what to change when it would refuse it
    CheckConfig,
    /// Apply one NodeSpec (JSON) once and exit
    Apply {
        /// The spec, as JSON
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
        /// Treat DIR as the filesystem root (state goes under DIR/<state_dir>); systemd is not
        /// touched: units are taken as running and the calls it would get are printed
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
}

/// Exit status of a refused configuration: EX_CONFIG from sysexits.h.
const EX_CONFIG: i32 = 78;

/// Ends the process on a configuration it cannot run with, saying what to change.
fn refuse(error: impl std::fmt::Display) -> ! {
    eprintln!("hexa-agent: {error}");
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
    let mut config: AgentConfig =
        hexa_shared::config::load(args.config.as_deref(), DEFAULT_CONFIG_PATH.as_ref(), std::env::vars())
            .unwrap_or_else(|e| refuse(e));
    let set = |target: &mut String, value: Option<String>| {
        if let Some(v) = value {
            *target = v;
        }
    };
    set(&mut config.coordinator, args.coordinator);
    set(&mut config.token, args.token);
    set(&mut config.ca_hash, args.ca_hash);
    set(&mut config.node_name, args.node_name);
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(file) = args.token_file {
        config.token_file = file;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    match args.command {
        Some(Command::Apply { spec, root }) => {
            hexa_shared::logging::init(config.log_format);
            return apply_once(&config, &spec, root);
        }
        Some(Command::CheckConfig) => {
            config.check(&file).unwrap_or_else(|e| refuse(e));
            println!("config file {file}: the agent would start with it (coordinator {})", config.coordinator);
            return Ok(());
        }
        None => config.check(&file).unwrap_or_else(|e| refuse(e)),
    }
    hexa_shared::logging::init(config.log_format);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let service = hexa_shared::service::ServiceManager::from_env();
        let host = hexa_agent::Host { service: service.clone(), ..hexa_agent::Host::for_config(&config) };
        let mut agent = tokio::spawn(hexa_agent::run(config, host, stopped));
        tokio::select! {
            result = &mut agent => return result.context("agent task")?.map_err(anyhow::Error::from),
            signal = hexa_shared::signals::wait_for_termination() => signal?,
        }
        tracing::info!("stopping");
        // The firewall is left as it is: isolation stays in force while the agent is away.
        service.stopping("stopping; the isolation in force stays");
        let _ = stop.send(true);
        // The agent closes its link with a reason before the process ends.
        agent.await.context("agent task")?.map_err(anyhow::Error::from)
    })
}

/// `hexa-agent apply`: applies one spec and exits. Under `--root DIR` files go below DIR and neither
/// the service manager nor the firewall is touched: units are taken as running, and what systemd
/// would have been asked and the firewall batch that would have been applied are printed instead.
fn apply_once(config: &AgentConfig, spec_path: &std::path::Path, root: Option<PathBuf>) -> anyhow::Result<()> {
    use std::sync::Arc;
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec: hexa_shared::spec::NodeSpec =
        serde_json::from_str(&text).with_context(|| format!("{} is not a NodeSpec", spec_path.display()))?;
    let (host, state_dir) = match &root {
        Some(root) => {
            let local_pods = hexa_agent::Host::local_pods_under(config, root);
            let local = local_pods.local_pods();
            let host = hexa_agent::Host {
                root: root.clone(),
                // Units are taken as running; what systemd would be asked is printed.
                systemd: Arc::new(hexa_agent::k3s::DryRunSystemd::new(&["k3s.service", "k3s-agent.service"])),
                readiness: Arc::new(hexa_agent::k3s::KubectlReadiness::under(root)),
                // Under a root the node's own firewall is not touched either: the batch is printed.
                firewall: Arc::new(hexa_agent::isolation::DryRunFirewall::new(spec.isolation.as_ref(), &local)?),
                local_pods,
                ..hexa_agent::Host::default()
            };
            (host, root.join(config.state_dir.strip_prefix("/").unwrap_or(&config.state_dir)))
        }
        None => (hexa_agent::Host::for_config(config), config.state_dir.clone()),
    };
    let applier = host.applier(hexa_agent::state::StateDir::open(&state_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(applier.apply(&spec))?;
    println!("applied generation {}", spec.generation);
    Ok(())
}
