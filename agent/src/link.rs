//! The agent's side of the link: one long-lived mutual-TLS QUIC connection to the coordinator,
//! re-established with jittered exponential backoff whenever it drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use hexa_shared::clock::now_unix;
use hexa_shared::host_access::HostAccess;
use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME};
use hexa_shared::proto::{
    AgentMessage, CoordinatorMessage, Hello, PROTOCOL_VERSION, Refusal, RefusalCode, SystemInfo, Welcome, close_code,
};
use hexa_shared::service::ServiceManager;
use hexa_shared::spec::AppliedStatus;
use hexa_shared::wire::{self, FrameError};

use crate::backoff::backoff_delay;
use crate::enroll::new_key_and_csr;
use crate::error::AgentError;
use crate::node::{Event, Node};
use crate::state::StateDir;

/// The coordinator acknowledges every report; after this many silent intervals (and at least
/// [`MIN_SILENCE`]) the link is presumed dead. QUIC's idle timeout alone would take longer, and a
/// coordinator restarted on the same address cannot reset connections it no longer knows.
const SILENT_INTERVALS: u32 = 3;
const MIN_SILENCE: Duration = Duration::from_secs(3);

/// Fraction of a certificate's lifetime after which the agent asks for a new one.
const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;

pub fn renewal_due(not_before_unix: i64, not_after_unix: i64, now_unix: i64) -> bool {
    let lifetime = (not_after_unix - not_before_unix).max(0) as f64;
    now_unix as f64 >= not_before_unix as f64 + lifetime * RENEW_AT_FRACTION
}

pub fn system_info() -> SystemInfo {
    SystemInfo {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// The opening message of a link for the node `node_name`, as this agent build sends it.
pub fn hello(node_name: &str, applied_generation: u64, system: SystemInfo) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        node_name: node_name.to_string(),
        applied_generation,
        system,
    }
}

/// The report interval the coordinator asked for in its welcome (never below 100ms).
pub fn report_interval(welcome: &Welcome) -> Duration {
    Duration::from_millis(welcome.report_interval_ms.max(100))
}

/// How long a link may go without hearing from the coordinator before the agent presumes it dead.
pub fn silence_limit(interval: Duration) -> Duration {
    (interval * SILENT_INTERVALS).max(MIN_SILENCE)
}

/// An open session: the connection, its control stream, the coordinator's welcome, and the frames
/// the coordinator sends after it (read in a task of their own, which `reader` stops when dropped:
/// a partially read frame must never be dropped by `select!`).
#[derive(Debug)]
pub struct Session {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub msgs: mpsc::Receiver<Result<CoordinatorMessage, FrameError>>,
    pub reader: wire::AbortOnDrop,
    pub welcome: Welcome,
}

/// Why no session could be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Retrying may help (no answer, connection lost, a refusal that can pass): back off and retry.
    Failed(String),
    /// A refusal no retry can fix: the operator must act.
    Refused(Refusal),
    /// A coordinator that follows another named the leader (`HOST:PORT`).
    FollowLeader(String),
}

/// Opens a session with the coordinator at `addr`: connects with `config` on the shared
/// `endpoint`, sends `hello` on the control stream and waits for the welcome.
pub async fn open_session(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: quinn::ClientConfig,
    hello: &Hello,
) -> Result<Session, OpenError> {
    let failed = |e: &dyn std::fmt::Display| OpenError::Failed(e.to_string());
    let conn = endpoint.connect_with(config, addr, COORDINATOR_SERVER_NAME).map_err(|e| failed(&e))?;
    let conn = conn.await.map_err(|e| failed(&e))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
    wire::write_frame(&mut send, hello).await.map_err(|e| failed(&e))?;
    let closed = |conn: &quinn::Connection, e: String| OpenError::Failed(close_reason(conn).unwrap_or(e));
    let welcome = match tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut recv)).await {
        Err(_) => return Err(OpenError::Failed("no welcome within 10s".into())),
        Ok(Err(e)) => return Err(closed(&conn, e.to_string())),
        Ok(Ok(None)) => return Err(closed(&conn, "closed".into())),
        Ok(Ok(Some(CoordinatorMessage::Welcome(welcome)))) => welcome,
        Ok(Ok(Some(CoordinatorMessage::Refused(refusal)))) => {
            return Err(match refusal.code {
                RefusalCode::UnsupportedVersion
                | RefusalCode::CertificateSuperseded
                | RefusalCode::CertificateRevoked => OpenError::Refused(refusal),
                _ => OpenError::Failed(refusal.to_string()),
            });
        }
        Ok(Ok(Some(CoordinatorMessage::FollowLeader { leader }))) => return Err(OpenError::FollowLeader(leader)),
        Ok(Ok(Some(other))) => return Err(OpenError::Failed(format!("expected a welcome, got {other:?}"))),
    };
    let (msgs, reader) = wire::spawn_reader::<CoordinatorMessage, _>(recv);
    Ok(Session { conn, send, msgs, reader, welcome })
}

/// How a session ended.
enum SessionEnd {
    /// The connection was up and working; reconnect promptly.
    Dropped(String),
    /// Could not get a working session; back off.
    Failed(String),
    /// The coordinator follows another and named the leader (`HOST:PORT`): go there.
    FollowLeader(String),
    /// Asked to stop.
    Shutdown,
}

/// How long a session may take to open when there are other coordinator addresses to try.
const HANDSHAKE_TIMEOUT_AMONG_SEVERAL: Duration = Duration::from_secs(2);

/// The session with the coordinator. The node's work is the supervisor's ([`Node`]); the link
/// passes specs to it, reports what it answers, and tells the coordinator the apply results.
#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    /// The coordinator addresses (at least one); `addrs[current]` is the one in use, where a
    /// dropped link is tried again first.
    addrs: Vec<SocketAddr>,
    current: usize,
    state: StateDir,
    node: Node,
    /// Apply results the coordinator has not been told yet (the link may drop meanwhile).
    unsent: Vec<AppliedStatus>,
    /// Told when the link comes up and when it drops (STATUS).
    service: Arc<ServiceManager>,
    /// The root K3s is installed under, where a `server` node finds the admin kubeconfig it mints
    /// the coordinator's host-cluster access with.
    k3s_root: std::path::PathBuf,
}

impl Link {
    /// A link to the coordinator at the first of `addrs`, which must not be empty; with several,
    /// a session that cannot be opened moves on to the next.
    pub fn new(endpoint: quinn::Endpoint, addrs: Vec<SocketAddr>, state: StateDir, node: Node) -> Link {
        assert!(!addrs.is_empty(), "a link needs a coordinator address");
        Link {
            endpoint,
            addrs,
            current: 0,
            state,
            node,
            unsent: Vec::new(),
            service: ServiceManager::none(),
            k3s_root: std::path::PathBuf::from("/"),
        }
    }

    /// Looks for K3s under `root` instead of `/` when asked for host-cluster access.
    pub fn with_k3s_root(mut self, root: std::path::PathBuf) -> Link {
        self.k3s_root = root;
        self
    }

    /// Tells `service` when the link comes up and when it drops.
    pub fn notifying(mut self, service: Arc<ServiceManager>) -> Link {
        self.service = service;
        self
    }

    /// The coordinator address in use.
    fn addr(&self) -> SocketAddr {
        self.addrs[self.current]
    }

    /// Makes the leader a follower named (`HOST:PORT`) the address in use, adding it to the
    /// addresses when it is not one of them (the name resolves to one this node was not given).
    /// False when it does not resolve: the next address is tried as after a failure.
    async fn follow(&mut self, leader: &str) -> bool {
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(leader).await {
            Ok(found) => found.filter(|a| a.is_ipv4() == self.addr().is_ipv4()).collect(),
            Err(e) => {
                warn!(%leader, error = %e, "cannot resolve the leader's address");
                Vec::new()
            }
        };
        let Some(first) = resolved.first().copied() else {
            self.current = (self.current + 1) % self.addrs.len();
            return false;
        };
        self.current = match resolved.iter().find_map(|a| self.addrs.iter().position(|known| known == a)) {
            Some(known) => known,
            None => {
                self.addrs.push(first);
                self.addrs.len() - 1
            }
        };
        true
    }

    fn link_status(&self, what: &str) {
        let generation = self.node.applied_generation();
        self.service.status(&format!("{what}; applied generation {generation}"));
    }

    /// Keeps the link up until `shutdown` turns true. Only errors no retry can fix end it early.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut attempt = 0u32;
        // Sent to the leader by a follower, and not linked since: a second such answer in a row
        // (a leader that changed again, followers disagreeing for a moment) backs off first.
        let mut redirected = false;
        loop {
            match self.session(&mut shutdown).await? {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::FollowLeader(leader) => {
                    let moved = self.follow(&leader).await;
                    info!(%leader, moved, "the coordinator follows another; linking to the leader");
                    self.link_status(&format!("the coordinator follows another; linking to the leader at {leader}"));
                    if moved && !std::mem::replace(&mut redirected, true) {
                        continue;
                    }
                }
                SessionEnd::Dropped(reason) => {
                    redirected = false;
                    warn!(%reason, "link lost; reconnecting");
                    self.link_status(&format!("link to the coordinator lost ({reason}); reconnecting"));
                    attempt = 0;
                }
                SessionEnd::Failed(reason) => {
                    warn!(%reason, attempt, coordinator = %self.addr(), "cannot reach the coordinator");
                    self.link_status(&format!("cannot reach the coordinator at {} ({reason}); retrying", self.addr()));
                    if self.addrs.len() > 1 {
                        // Another coordinator may lead now: each address is tried in turn, the
                        // whole round before backing off further.
                        self.current = (self.current + 1) % self.addrs.len();
                        if self.current != 0 {
                            continue;
                        }
                    }
                }
            }
            let delay = backoff_delay(attempt, rand::rng().random::<f64>());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, AgentError> {
        self.link_status(&format!("connecting to the coordinator at {}", self.addr()));
        let identity = self.state.load_identity()?;
        let config = pki::link_client_config(&identity.ca, identity.chain.clone(), identity.key_der()?)?;
        let hello = hello(&identity.node_name, self.node.applied_generation(), system_info());
        // With one address there is nothing else to try: the handshake gets QUIC's whole idle
        // timeout. With several, a coordinator that does not answer soon is a follower or gone.
        let handshake_limit =
            if self.addrs.len() > 1 { HANDSHAKE_TIMEOUT_AMONG_SEVERAL } else { pki::IDLE_TIMEOUT * 2 };
        let session = tokio::select! {
            opened = tokio::time::timeout(handshake_limit, open_session(&self.endpoint, self.addr(), config, &hello)) => match opened {
                Ok(Ok(session)) => session,
                Ok(Err(OpenError::Failed(reason))) => return Ok(SessionEnd::Failed(reason)),
                Ok(Err(OpenError::Refused(refusal))) => return Err(AgentError::Refused(refusal)),
                Ok(Err(OpenError::FollowLeader(leader))) => return Ok(SessionEnd::FollowLeader(leader)),
                Err(_) => return Ok(SessionEnd::Failed(format!("no answer within {handshake_limit:?}"))),
            },
            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
        };
        let Session { conn, mut send, mut msgs, reader, welcome } = session;
        let interval = report_interval(&welcome);
        info!(node = %welcome.node_name, pool = %welcome.pool, interval_ms = welcome.report_interval_ms, "connected to the coordinator");
        self.link_status(&format!("connected to the coordinator at {} as {}", self.addr(), welcome.node_name));

        let end = self.exchange(&conn, &mut send, &mut msgs, interval, &identity, shutdown).await;
        drop(reader);
        if matches!(end, Ok(SessionEnd::Shutdown)) {
            conn.close(close_code::DONE.into(), b"agent stopping");
        }
        end
    }

    async fn exchange(
        &mut self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        msgs: &mut mpsc::Receiver<Result<CoordinatorMessage, FrameError>>,
        interval: Duration,
        identity: &crate::state::Identity,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AgentError> {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_key: Option<rcgen::KeyPair> = None;
        let (mut not_before, mut not_after) = (identity.not_before_unix, identity.not_after_unix);
        let mut sent_at: Option<(u64, Instant)> = None;
        let silence_limit = silence_limit(interval);
        let mut last_heard = Instant::now();
        // Host-cluster access is minted off the link's loop (it waits on K3s' token controller);
        // an answer for a session that has ended dies with it: the coordinator asks again.
        let (minted_tx, mut minted_rx) = mpsc::channel::<Result<HostAccess, String>>(1);
        let mut minting = false;
        loop {
            let mut report_now = false;
            tokio::select! {
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return Ok(SessionEnd::Dropped(format!(
                            "no answer from the coordinator for {}ms", last_heard.elapsed().as_millis()
                        )));
                    }
                    report_now = true;
                }
                msg = msgs.recv() => match msg {
                    None => return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| "stream closed".into()))),
                    Some(Err(e)) => return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| e.to_string()))),
                    Some(Ok(CoordinatorMessage::Spec(spec))) => {
                        last_heard = Instant::now();
                        self.node.submit(*spec)?;
                    }
                    Some(Ok(CoordinatorMessage::ReportAck { seq })) => {
                        last_heard = Instant::now();
                        if let Some((sent_seq, at)) = sent_at.take_if(|(s, _)| *s == seq) {
                            debug!(seq = sent_seq, rtt_us = at.elapsed().as_micros() as u64, "report acknowledged");
                        }
                    }
                    Some(Ok(CoordinatorMessage::CertificateRenewed { cert_chain_der })) => {
                        if let Some(key) = pending_key.take() {
                            self.state.save_renewal(&key.serialize_pem(), &cert_chain_der)?;
                            let renewed = self.state.load_identity()?;
                            (not_before, not_after) = (renewed.not_before_unix, renewed.not_after_unix);
                            info!(not_after_unix = not_after, "certificate renewed; used from the next connection");
                        }
                    }
                    Some(Ok(CoordinatorMessage::RenewalRefused(refusal))) => {
                        pending_key = None;
                        warn!(reason = %refusal, "certificate renewal refused");
                    }
                    Some(Ok(CoordinatorMessage::HostAccessRequest)) => {
                        last_heard = Instant::now();
                        if !minting {
                            minting = true;
                            info!("the coordinator asks for host-cluster access");
                            let (root, minted) = (self.k3s_root.clone(), minted_tx.clone());
                            tokio::spawn(async move {
                                let result = crate::k3s::host_access::mint(&root).await.map_err(|e| e.to_string());
                                let _ = minted.send(result).await;
                            });
                        }
                    }
                    Some(Ok(other)) => debug!(?other, "ignoring unexpected message"),
                },
                Some(minted) = minted_rx.recv() => {
                    minting = false;
                    if let Err(why) = &minted {
                        warn!(reason = %why, "cannot mint host-cluster access");
                    }
                    if let Err(e) = wire::write_frame(send, &AgentMessage::HostAccess(minted)).await {
                        return Ok(SessionEnd::Dropped(e.to_string()));
                    }
                }
                event = self.node.event() => {
                    let mut event = Some(event?);
                    // Take whatever else is waiting too (events pile up while the link is down).
                    while let Some(next) = event {
                        match next {
                            Event::Status(status) => self.unsent.push(status),
                            Event::Changed => report_now = true,
                        }
                        event = self.node.try_event();
                    }
                }
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
            for status in std::mem::take(&mut self.unsent) {
                if let Err(e) = wire::write_frame(send, &AgentMessage::Applied(status.clone())).await {
                    self.unsent.push(status);
                    return Ok(SessionEnd::Dropped(e.to_string()));
                }
            }
            if report_now {
                if let Some(report) = self.node.report().await? {
                    sent_at = Some((report.seq, Instant::now()));
                    if let Err(e) = wire::write_frame(send, &AgentMessage::Report(Box::new(report))).await {
                        return Ok(SessionEnd::Dropped(close_reason(conn).unwrap_or_else(|| e.to_string())));
                    }
                }
                if pending_key.is_none() && renewal_due(not_before, not_after, now_unix()) {
                    let (key, csr_der) = new_key_and_csr()?;
                    pending_key = Some(key);
                    info!(not_after_unix = not_after, "asking for a new certificate");
                    if let Err(e) = wire::write_frame(send, &AgentMessage::RenewCertificate { csr_der }).await {
                        return Ok(SessionEnd::Dropped(e.to_string()));
                    }
                }
            }
        }
    }
}

/// The reason the coordinator gave when it closed the connection, if it did.
pub fn close_reason(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Some(format!("coordinator closed the link: {}", String::from_utf8_lossy(&close.reason)))
        }
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_after_two_thirds_of_the_lifetime() {
        assert!(!renewal_due(0, 300, 199));
        assert!(renewal_due(0, 300, 200));
        assert!(renewal_due(0, 0, 0));
    }
}
