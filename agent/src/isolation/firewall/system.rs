//! The kernel's firewall through the `iptables` and `ipset` tools.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::plan::Batch;
use super::ruleset::Ruleset;
use super::{Firewall, FirewallError};

/// The real thing: `iptables-save`/`iptables-restore --noflush`, the same for `ip6tables`, and
/// `ipset save`/`ipset restore`, optionally behind a command prefix such as `ip netns exec <ns>`.
#[derive(Debug, Clone)]
pub struct SystemFirewall {
    prefix: Vec<String>,
    iptables: String,
    ip6tables: String,
    ipset: String,
}

impl Default for SystemFirewall {
    fn default() -> Self {
        SystemFirewall {
            prefix: Vec::new(),
            iptables: "iptables".into(),
            ip6tables: "ip6tables".into(),
            ipset: "ipset".into(),
        }
    }
}

/// The settings that make bridged traffic meet the IPv4 and IPv6 hooks.
const BRIDGE_FILTERING: [&str; 2] = ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"];

/// How long each step of an apply took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTimes {
    pub ipset_prepare: Duration,
    pub iptables: Duration,
    pub ip6tables: Duration,
    pub ipset_cleanup: Duration,
}

impl SystemFirewall {
    /// The node's own namespace, with the default `iptables` (nf_tables on Debian 12).
    pub fn new() -> SystemFirewall {
        SystemFirewall::default()
    }

    /// Runs every command through `ip netns exec <name>`.
    pub fn in_netns(name: &str) -> SystemFirewall {
        SystemFirewall::with_prefix(["ip", "netns", "exec", name].map(String::from).to_vec())
    }

    /// Runs every command as `<prefix...> <command>`.
    pub fn with_prefix(prefix: Vec<String>) -> SystemFirewall {
        SystemFirewall { prefix, ..SystemFirewall::default() }
    }

    /// Uses `<base>`, `<base>-save` and `<base>-restore` (e.g. `iptables-legacy`) instead of
    /// `iptables`, and the same spelling of `ip6tables`: the agent must use the backend K3s uses,
    /// or both rule sets apply side by side.
    pub fn with_iptables(mut self, base: &str) -> SystemFirewall {
        self.iptables = base.to_string();
        self.ip6tables = match base.strip_prefix("iptables") {
            Some(rest) => format!("ip6tables{rest}"),
            None => base.replacen("iptables", "ip6tables", 1),
        };
        self
    }

    /// The `iptables` binary this firewall runs (for one-rule-at-a-time baselines).
    pub fn iptables_binary(&self) -> &str {
        &self.iptables
    }

    /// The `ip6tables` binary this firewall runs.
    pub fn ip6tables_binary(&self) -> &str {
        &self.ip6tables
    }

    /// Applies the batch like [`Firewall::apply`] and says how long each step took.
    pub fn apply_timed(&self, batch: &Batch) -> Result<StepTimes, FirewallError> {
        let mut times = StepTimes::default();
        let ipset = self.ipset.clone();
        let iptables_restore = format!("{}-restore", self.iptables);
        let ip6tables_restore = format!("{}-restore", self.ip6tables);
        let steps: [(&str, &[&str], &str, &mut Duration); 4] = [
            (&ipset, &["restore"], &batch.ipset_prepare, &mut times.ipset_prepare),
            (&iptables_restore, &["-w", "5", "--noflush"], &batch.iptables, &mut times.iptables),
            (&ip6tables_restore, &["-w", "5", "--noflush"], &batch.ip6tables, &mut times.ip6tables),
            (&ipset, &["restore"], &batch.ipset_cleanup, &mut times.ipset_cleanup),
        ];
        for (program, args, input, time) in steps {
            if input.is_empty() {
                continue;
            }
            let started = Instant::now();
            self.run(program, args, Some(input))?;
            *time = started.elapsed();
        }
        Ok(times)
    }

    /// Runs one command (through the prefix) and returns its standard output.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        let mut argv: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        argv.push(program);
        argv.extend_from_slice(args);
        let command = argv.join(" ");
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| FirewallError::Spawn { command: command.clone(), source })?;
        let output = std::thread::scope(|scope| {
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // A writer thread, so that a child filling its stderr cannot deadlock against us.
                // A write error means the child exited early; its status tells why.
                scope.spawn(move || pipe.write_all(input.as_bytes()));
            }
            child.wait_with_output()
        })
        .map_err(|source| FirewallError::Spawn { command: command.clone(), source })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let detail = failed_line(&stderr, stdin.unwrap_or_default())
            .map(|line| format!("; the failing input line was: {line}"))
            .unwrap_or_default();
        Err(FirewallError::Command { command, status: output.status.to_string(), stderr, detail })
    }
}

/// Both tools name the input line they choke on as "line N".
pub(super) fn failed_line(stderr: &str, input: &str) -> Option<String> {
    let at = stderr.find("line ")?;
    let digits: String = stderr[at + 5..].chars().take_while(char::is_ascii_digit).collect();
    let n: usize = digits.parse().ok()?;
    input.lines().nth(n.checked_sub(1)?).map(str::to_string)
}

impl Firewall for SystemFirewall {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        // One table at a time: the nat table (kube-proxy's thousands of rules) is never read.
        let save = format!("{}-save", self.iptables);
        let mut iptables = self.run(&save, &["-t", "mangle"], None)?;
        iptables.push_str(&self.run(&save, &["-t", "filter"], None)?);
        let ip6tables = self.run(&format!("{}-save", self.ip6tables), &["-t", "mangle"], None)?;
        let ipset = self.run(&self.ipset, &["save"], None)?;
        Ruleset::from_saves(&iptables, &ip6tables, &ipset)
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        self.apply_timed(batch).map(|_| ())
    }

    fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError> {
        let mut wrote = false;
        for setting in BRIDGE_FILTERING {
            let refused = |why: String| FirewallError::BridgeFiltering { setting: setting.to_string(), why };
            let value = self.run("sysctl", &["-n", setting], None).map_err(|e| refused(e.to_string()))?;
            if value.trim() != "1" {
                self.run("sysctl", &["-q", "-w", &format!("{setting}=1")], None).map_err(|e| refused(e.to_string()))?;
                wrote = true;
            }
        }
        Ok(wrote)
    }
}
