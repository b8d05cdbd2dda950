//! The `Systemd` seam: the few service-manager operations the installer needs, with the production
//! implementation (`systemctl`), a dry run for `hexa-agent apply --root` that prints what it would
//! be asked, and a recording fake for tests (with the `testing` feature) side by side.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{command}` failed: {message}")]
pub struct SystemdError {
    /// The command as a person would type it.
    pub command: String,
    pub message: String,
}

/// What the installer asks of the service manager.
pub trait Systemd: Send + Sync + fmt::Debug {
    fn daemon_reload(&self) -> Result<(), SystemdError>;
    /// Makes `unit` start at boot.
    fn enable(&self, unit: &str) -> Result<(), SystemdError>;
    /// Restarts `unit`, starting it if it is stopped. Queues the job and returns: K3s may take
    /// minutes to become ready, which [`super::readiness`] observes.
    fn restart(&self, unit: &str) -> Result<(), SystemdError>;
    /// Stops `unit`; a unit systemd does not know is already stopped.
    fn stop(&self, unit: &str) -> Result<(), SystemdError>;
    fn disable(&self, unit: &str) -> Result<(), SystemdError>;
    /// Whether `unit` is running or on its way up (active, activating, reloading).
    fn is_active(&self, unit: &str) -> Result<bool, SystemdError>;
}

/// The real service manager, through `systemctl`. It acts on the running system whatever root the
/// installer writes files under: use it with the root `/`.
#[derive(Debug, Clone)]
pub struct Systemctl {
    program: PathBuf,
}

impl Default for Systemctl {
    fn default() -> Self {
        Systemctl { program: PathBuf::from("systemctl") }
    }
}

/// `systemctl stop` exits 5 for a unit that is not loaded.
const EXIT_UNIT_NOT_LOADED: i32 = 5;

impl Systemctl {
    /// A `systemctl` other than the one on `PATH`.
    pub fn with_program(program: impl Into<PathBuf>) -> Systemctl {
        Systemctl { program: program.into() }
    }

    /// Runs `systemctl args...`; returns its exit code and output, or an error when it cannot run.
    fn run(&self, args: &[&str]) -> Result<(Option<i32>, String, String), SystemdError> {
        let command = format!("{} {}", self.program.display(), args.join(" "));
        let output = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|e| SystemdError { command: command.clone(), message: format!("cannot run it: {e}") })?;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }

    fn run_ok(&self, args: &[&str], also_ok: &[i32]) -> Result<(), SystemdError> {
        let (code, _, stderr) = self.run(args)?;
        match code {
            Some(0) => Ok(()),
            Some(c) if also_ok.contains(&c) => Ok(()),
            _ => Err(SystemdError {
                command: format!("{} {}", self.program.display(), args.join(" ")),
                message: format!(
                    "exit status {}: {}",
                    code.map_or_else(|| "killed by a signal".to_string(), |c| c.to_string()),
                    if stderr.is_empty() { "no message" } else { &stderr }
                ),
            }),
        }
    }
}

impl Systemd for Systemctl {
    fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.run_ok(&["daemon-reload"], &[])
    }

    fn enable(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_ok(&["enable", unit], &[])
    }

    fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_ok(&["restart", "--no-block", unit], &[])
    }

    fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_ok(&["stop", unit], &[EXIT_UNIT_NOT_LOADED])
    }

    fn disable(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_ok(&["disable", unit], &[])
    }

    fn is_active(&self, unit: &str) -> Result<bool, SystemdError> {
        // is-active exits non-zero for every state but "active"; the state it prints is the answer.
        let (_, stdout, _) = self.run(&["is-active", unit])?;
        Ok(matches!(stdout.as_str(), "active" | "activating" | "reloading" | "refreshing"))
    }
}

/// One request made of the service manager, as a dry run prints it and a test records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemdCall {
    DaemonReload,
    Enable(String),
    Restart(String),
    Stop(String),
    Disable(String),
}

#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
struct Recorded {
    calls: Vec<SystemdCall>,
    active: BTreeSet<String>,
    fail_restart: Option<String>,
}

/// A service manager that records what it is asked and keeps track of which units would be
/// running: a restart makes a unit active, a stop makes it inactive.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct RecordingSystemd {
    inner: Mutex<Recorded>,
}

#[cfg(any(test, feature = "testing"))]
impl RecordingSystemd {
    pub fn new() -> RecordingSystemd {
        RecordingSystemd::default()
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every request so far, oldest first.
    pub fn calls(&self) -> Vec<SystemdCall> {
        self.lock().calls.clone()
    }

    /// Every request so far, forgetting them.
    pub fn take_calls(&self) -> Vec<SystemdCall> {
        std::mem::take(&mut self.lock().calls)
    }

    /// Marks `unit` as running or not, as if it had started or crashed.
    pub fn set_active(&self, unit: &str, active: bool) {
        let mut inner = self.lock();
        if active {
            inner.active.insert(unit.to_string());
        } else {
            inner.active.remove(unit);
        }
    }

    /// Makes every following restart fail with `message` (`None`: succeed again).
    pub fn fail_restarts(&self, message: Option<&str>) {
        self.lock().fail_restart = message.map(str::to_string);
    }

    fn record(&self, call: SystemdCall) {
        self.lock().calls.push(call);
    }
}

#[cfg(any(test, feature = "testing"))]
impl Systemd for RecordingSystemd {
    fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.record(SystemdCall::DaemonReload);
        Ok(())
    }

    fn enable(&self, unit: &str) -> Result<(), SystemdError> {
        self.record(SystemdCall::Enable(unit.to_string()));
        Ok(())
    }

    fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.record(SystemdCall::Restart(unit.to_string()));
        let mut inner = self.lock();
        if let Some(message) = &inner.fail_restart {
            return Err(SystemdError { command: format!("systemctl restart {unit}"), message: message.clone() });
        }
        inner.active.insert(unit.to_string());
        Ok(())
    }

    fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.record(SystemdCall::Stop(unit.to_string()));
        self.lock().active.remove(unit);
        Ok(())
    }

    fn disable(&self, unit: &str) -> Result<(), SystemdError> {
        self.record(SystemdCall::Disable(unit.to_string()));
        Ok(())
    }

    fn is_active(&self, unit: &str) -> Result<bool, SystemdError> {
        Ok(self.lock().active.contains(unit))
    }
}

/// The service manager of `hexa-agent apply --root`: nothing is asked of the real one. Each request
/// is printed as `would run: systemctl <request>` instead, and the units it would leave running
/// are tracked (a restart starts a unit, a stop stops it) so that the installer sees a consistent
/// picture.
pub struct DryRunSystemd {
    active: Mutex<BTreeSet<String>>,
    out: Mutex<Box<dyn Write + Send>>,
}

impl fmt::Debug for DryRunSystemd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DryRunSystemd").field("active", &self.active).finish_non_exhaustive()
    }
}

impl DryRunSystemd {
    /// A dry run on standard output, with `running` taken as running.
    pub fn new(running: &[&str]) -> DryRunSystemd {
        DryRunSystemd::with_output(running, Box::new(std::io::stdout()))
    }

    /// A dry run that prints to `out`.
    pub fn with_output(running: &[&str], out: Box<dyn Write + Send>) -> DryRunSystemd {
        DryRunSystemd {
            active: Mutex::new(running.iter().map(|unit| unit.to_string()).collect()),
            out: Mutex::new(out),
        }
    }

    fn active(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
        self.active.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn print(&self, call: SystemdCall) -> Result<(), SystemdError> {
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        writeln!(out, "would run: systemctl {call:?}").map_err(|e| SystemdError {
            command: format!("systemctl {call:?}"),
            message: format!("cannot print the dry run: {e}"),
        })
    }
}

impl Systemd for DryRunSystemd {
    fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.print(SystemdCall::DaemonReload)
    }

    fn enable(&self, unit: &str) -> Result<(), SystemdError> {
        self.print(SystemdCall::Enable(unit.to_string()))
    }

    fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.print(SystemdCall::Restart(unit.to_string()))?;
        self.active().insert(unit.to_string());
        Ok(())
    }

    fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.print(SystemdCall::Stop(unit.to_string()))?;
        self.active().remove(unit);
        Ok(())
    }

    fn disable(&self, unit: &str) -> Result<(), SystemdError> {
        self.print(SystemdCall::Disable(unit.to_string()))
    }

    fn is_active(&self, unit: &str) -> Result<bool, SystemdError> {
        Ok(self.active().contains(unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_tracks_what_would_run() {
        let systemd = RecordingSystemd::new();
        assert!(!systemd.is_active("k3s.service").unwrap());
        systemd.restart("k3s.service").unwrap();
        assert!(systemd.is_active("k3s.service").unwrap());
        systemd.stop("k3s.service").unwrap();
        assert!(!systemd.is_active("k3s.service").unwrap());
        systemd.fail_restarts(Some("Job for k3s.service failed"));
        assert!(systemd.restart("k3s.service").unwrap_err().to_string().contains("Job for k3s.service failed"));
        assert_eq!(
            systemd.take_calls(),
            [
                SystemdCall::Restart("k3s.service".into()),
                SystemdCall::Stop("k3s.service".into()),
                SystemdCall::Restart("k3s.service".into())
            ]
        );
        assert!(systemd.calls().is_empty());
    }

    use crate::printed::Printed;

    #[test]
    fn the_dry_run_prints_every_call_and_tracks_what_would_run() {
        let printed = Printed::default();
        let systemd = DryRunSystemd::with_output(&["k3s.service"], Box::new(printed.clone()));
        assert!(systemd.is_active("k3s.service").unwrap());
        assert!(!systemd.is_active("k3s-agent.service").unwrap());
        systemd.daemon_reload().unwrap();
        systemd.stop("k3s.service").unwrap();
        assert!(!systemd.is_active("k3s.service").unwrap());
        systemd.restart("k3s-agent.service").unwrap();
        assert!(systemd.is_active("k3s-agent.service").unwrap());
        let text = printed.text();
        assert_eq!(
            text,
            "would run: systemctl DaemonReload\nwould run: systemctl Stop(\"k3s.service\")\n\
             would run: systemctl Restart(\"k3s-agent.service\")\n"
        );
    }

    #[test]
    fn systemctl_failures_name_the_command() {
        // A stand-in systemctl that fails the way systemctl does.
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("systemctl");
        std::fs::write(
            &program,
            "#!/bin/sh\ncase \"$1\" in\n  is-active) echo activating; exit 3;;\n  stop) exit 5;;\n  \
             *) echo \"Unit $2 not found.\" >&2; exit 1;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let systemctl = Systemctl::with_program(&program);
        assert!(systemctl.is_active("k3s.service").unwrap(), "activating counts as on its way up");
        systemctl.stop("k3s.service").unwrap();
        let err = systemctl.enable("k3s.service").unwrap_err().to_string();
        assert!(err.contains("enable k3s.service` failed: exit status 1: Unit k3s.service not found."), "{err}");
        let missing = Systemctl::with_program(dir.path().join("nope")).daemon_reload().unwrap_err().to_string();
        assert!(missing.contains("cannot run it"), "{missing}");
    }
}
