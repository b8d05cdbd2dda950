//! What a daemon tells its service manager (sd_notify(3)): `READY=1` once it really serves,
//! `STATUS=` lines when something an operator would look for in `systemctl status` changes, and
//! `WATCHDOG=1` from the loop whose hang would leave the daemon useless, so that systemd restarts a
//! daemon that is alive but stuck. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.
//!
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` are read once, by [`ServiceManager::from_env`]; tests give
//! the socket and the watchdog timeout directly ([`ServiceManager::with_socket`]) and read the
//! datagrams from a socket of their own.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How many pings the loop sends per watchdog timeout: systemd's advice is at least two, and a few
/// more leave room for a slow pass of the loop.
const PINGS_PER_TIMEOUT: u32 = 4;

#[derive(Debug, Default)]
struct State {
    ready: bool,
    status: String,
    last_ping: Option<Instant>,
    warned: bool,
}

/// The service manager of this process, shared by whoever has news for it.
#[derive(Debug, Default)]
pub struct ServiceManager {
    /// `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket. `None`: not under systemd.
    socket: Option<OsString>,
    /// `WATCHDOG_USEC`: how long systemd waits for a ping before it kills and restarts us.
    watchdog: Option<Duration>,
    state: Mutex<State>,
}

impl ServiceManager {
    /// The service manager the environment names (`NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID`), or one that is told nothing when there is none.
    pub fn from_env() -> Arc<ServiceManager> {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let watchdog = sd_notify::watchdog_enabled().filter(|timeout| !timeout.is_zero());
        Arc::new(ServiceManager { socket, watchdog, state: Mutex::default() })
    }

    /// A service manager listening on `socket`, expecting pings within `watchdog`.
    pub fn with_socket(socket: impl Into<OsString>, watchdog: Option<Duration>) -> ServiceManager {
        ServiceManager { socket: Some(socket.into()), watchdog, state: Mutex::default() }
    }

    /// No service manager: every call does nothing.
    pub fn none() -> Arc<ServiceManager> {
        Arc::new(ServiceManager::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data: a panic elsewhere while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether [`ready`](Self::ready) has been said.
    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// Says the daemon is ready (once; later calls only update the status line).
    pub fn ready(&self, status: &str) {
        let mut state = self.lock();
        if state.ready {
            drop(state);
            self.status(status);
            return;
        }
        state.ready = true;
        state.status = status.to_string();
        self.send(&mut state, &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// Sets the status line `systemctl status` shows, when it changed.
    pub fn status(&self, status: &str) {
        let mut state = self.lock();
        if state.status == status {
            return;
        }
        state.status = status.to_string();
        self.send(&mut state, &[NotifyState::Status(status)]);
    }

    /// Says the daemon is stopping, and why.
    pub fn stopping(&self, status: &str) {
        let mut state = self.lock();
        state.status = status.to_string();
        self.send(&mut state, &[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// The watchdog timeout systemd enforces, if it enforces one.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// When the pinging loop has to come round next, at the latest, to keep the watchdog fed.
    pub fn next_ping(&self) -> Option<Instant> {
        let interval = self.watchdog? / PINGS_PER_TIMEOUT;
        Some(self.lock().last_ping.map_or_else(Instant::now, |last| last + interval))
    }

    /// Feeds the watchdog: call it from every pass of the loop that must not hang. Sends `WATCHDOG=1`
    /// when a fraction of the timeout has passed since the last one, so a busy loop sends few.
    pub fn ping(&self) {
        let Some(timeout) = self.watchdog else { return };
        let mut state = self.lock();
        let now = Instant::now();
        if state.last_ping.is_some_and(|last| now.duration_since(last) < timeout / PINGS_PER_TIMEOUT) {
            return;
        }
        state.last_ping = Some(now);
        self.send(&mut state, &[NotifyState::Watchdog]);
    }

    fn send(&self, state: &mut State, message: &[NotifyState<'_>]) {
        let Some(socket) = &self.socket else { return };
        let text: String = message.iter().map(|line| format!("{line}\n")).collect();
        if let Err(error) = send_datagram(socket, text.as_bytes()) {
            // Said once: a service manager that went away is not news at every ping.
            if !state.warned {
                state.warned = true;
                tracing::warn!(socket = %socket.to_string_lossy(), %error, "cannot notify the service manager");
            }
        }
    }
}

fn send_datagram(socket: &OsString, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(message, &addr)?
        }
        None => sender.send_to(message, socket)?,
    };
    if sent != message.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the notification was cut short"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, socket)
    }

    fn next(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_once_then_status_lines_only_when_they_change() {
        let (_dir, path, socket) = listener();
        let manager = ServiceManager::with_socket(&path, None);
        assert!(!manager.is_ready());
        manager.status("starting");
        manager.status("starting");
        manager.ready("serving");
        manager.ready("serving more");
        manager.stopping("asked to stop");
        socket.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=starting\n",
                "READY=1\nSTATUS=serving\n",
                "STATUS=serving more\n",
                "STOPPING=1\nSTATUS=asked to stop\n"
            ]
        );
        assert!(manager.is_ready());
    }

    #[test]
    fn pings_are_spaced_by_a_quarter_of_the_timeout() {
        let (_dir, path, socket) = listener();
        let manager = ServiceManager::with_socket(&path, Some(Duration::from_millis(400)));
        let before = Instant::now();
        assert!(manager.next_ping().unwrap() >= before, "the first ping is due at once");
        manager.ping();
        manager.ping();
        assert_eq!(next(&socket), "WATCHDOG=1\n");
        let due = manager.next_ping().unwrap();
        assert!(due >= before + Duration::from_millis(100), "{:?}", due - before);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        manager.ping();
        assert_eq!(next(&socket), "WATCHDOG=1\n");
        socket.set_nonblocking(true).unwrap();
        assert!(socket.recv(&mut [0u8; 64]).is_err(), "the second call of a pair sent nothing");
    }

    #[test]
    fn without_a_service_manager_nothing_is_sent_and_no_ping_is_due() {
        let manager = ServiceManager::none();
        manager.ready("serving");
        manager.ping();
        assert_eq!(manager.next_ping(), None);
        assert!(manager.is_ready());
        // A socket nobody listens on is reported, not fatal.
        let gone = ServiceManager::with_socket("/nonexistent/notify", Some(Duration::from_secs(1)));
        gone.ping();
        gone.ready("serving");
        assert!(gone.is_ready());
    }

    #[test]
    fn abstract_sockets_are_reached_by_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hexa-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ServiceManager::with_socket(format!("@{name}"), None).ready("up");
        assert_eq!(next(&socket), "READY=1\nSTATUS=up\n");
    }
}
