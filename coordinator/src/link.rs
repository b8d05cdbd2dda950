//! The coordinator's QUIC endpoint: enrollment on `hexa-enroll/1` and node links on `hexa/1`.
//!
//! Each connection runs in its own task, so one misbehaving peer (bad frame, wrong version, no
//! certificate) is closed with a reason and logged while every other node keeps being served.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use hexa_shared::pki;
use hexa_shared::proto::{
    ALPN_ENROLL, ALPN_LINK, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Hello, PROTOCOL_VERSION,
    Refusal, RefusalCode, Welcome, close_code,
};
use hexa_shared::wire::{self, FrameError, MAX_ENROLL_FRAME_LEN, MAX_FRAME_LEN};

use crate::inventory::{Admission, Inventory};
use crate::metrics::Metrics;

/// A peer gets this long to finish the handshake and send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// An enrollment must be sent whole within this of the handshake.
const ENROLL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on connections that have not authenticated yet (handshakes, enrollments, links before
/// their certificate is checked against the inventory): what anyone on the network can make the
/// coordinator hold. `[admission]` of the coordinator's configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionLimits {
    /// At most this many at once, from everyone.
    pub max_unauthenticated: usize,
    /// At most this many at once from one IP address.
    pub max_per_address: usize,
    /// Above this many at once, a new peer must first prove it receives at its address (QUIC
    /// Retry) before the coordinator keeps any state for it.
    pub retry_above: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits { max_unauthenticated: 256, max_per_address: 32, retry_above: 64 }
    }
}

impl AdmissionLimits {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        if self.max_unauthenticated == 0 {
            return Err(ConfigError::Zero { key: "admission.max_unauthenticated" });
        }
        if self.max_per_address == 0 {
            return Err(ConfigError::Zero { key: "admission.max_per_address" });
        }
        if self.max_per_address > self.max_unauthenticated {
            return Err(ConfigError::Invalid {
                key: "admission.max_per_address",
                message: format!(
                    "{} is above admission.max_unauthenticated ({}), which bounds every address together: lower it",
                    self.max_per_address, self.max_unauthenticated
                ),
            });
        }
        Ok(())
    }
}

/// Counts unauthenticated connections, in total and per address.
#[derive(Debug, Default)]
struct Gate {
    counts: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

/// One admitted unauthenticated connection; leaves the gate when dropped.
#[derive(Debug)]
struct Pass {
    gate: Arc<Gate>,
    ip: std::net::IpAddr,
}

impl Gate {
    fn in_flight(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn enter(self: &Arc<Self>, ip: std::net::IpAddr, limits: AdmissionLimits) -> Result<Pass, &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_address) = &mut *counts;
        if *total >= limits.max_unauthenticated {
            return Err("too_many_unauthenticated");
        }
        let mine = per_address.entry(ip).or_default();
        if *mine >= limits.max_per_address {
            return Err("too_many_from_address");
        }
        *mine += 1;
        *total += 1;
        Ok(Pass { gate: self.clone(), ip })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut counts = self.gate.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_address) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(mine) = per_address.get_mut(&self.ip) {
            *mine -= 1;
            if *mine == 0 {
                per_address.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug)]
pub struct LinkContext {
    pub inventory: Arc<Inventory>,
    pub metrics: Arc<Metrics>,
    pub report_interval: Duration,
    /// A link with nothing received for this long is closed: the node is Unreachable by then, and
    /// a peer that was killed never says goodbye.
    pub silence_limit: Duration,
    pub limits: AdmissionLimits,
    /// Where the links of `server` nodes wait for host-cluster access requests.
    pub access: Arc<crate::hostcluster::access::AccessRequests>,
}

/// Admits a connection attempt under `limits`: asks a stranger to prove its address first under
/// load (QUIC Retry), refuses one over the bounds, and otherwise returns its pass through the gate.
fn admit(
    incoming: quinn::Incoming,
    gate: &Arc<Gate>,
    limits: AdmissionLimits,
    metrics: &Metrics,
) -> Option<(quinn::Incoming, Pass)> {
    let peer = incoming.remote_address();
    if gate.in_flight() >= limits.retry_above && !incoming.remote_address_validated() && incoming.may_retry() {
        // Under load: no state for this peer until it shows it receives at its address.
        metrics.refused("retry_under_load");
        let _ = incoming.retry();
        return None;
    }
    match gate.enter(peer.ip(), limits) {
        Ok(pass) => Some((incoming, pass)),
        Err(reason) => {
            metrics.refused(reason);
            debug!(%peer, reason, "connection refused before the handshake");
            incoming.refuse();
            None
        }
    }
}

/// Finishes the handshake of an admitted connection within [`FIRST_MESSAGE_TIMEOUT`].
async fn handshake(incoming: quinn::Incoming, metrics: &Metrics) -> Option<quinn::Connection> {
    match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            metrics.handshake_failures.inc();
            warn!(error = %e, "handshake refused");
            None
        }
        Err(_) => {
            metrics.handshake_failures.inc();
            warn!("handshake timed out");
            None
        }
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<LinkContext>, mut shutdown: watch::Receiver<bool>) {
    let gate = Arc::new(Gate::default());
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        let Some((incoming, pass)) = admit(incoming, &gate, ctx.limits, &ctx.metrics) else { continue };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move {
                let Some(conn) = handshake(incoming, &ctx.metrics).await else { return };
                match pki::negotiated_alpn(&conn).as_deref() {
                    Some(ALPN_ENROLL) => serve_enrollment(conn, &ctx, pass).await,
                    Some(ALPN_LINK) => serve_link(conn, &ctx, pass, shutdown).await,
                    // rustls refuses unknown ALPNs during the handshake; this is belt and braces.
                    _ => conn.close(close_code::PROTOCOL.into(), b"unknown application protocol"),
                }
            }
            .instrument(info_span!("connection", %peer)),
        );
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
}

/// While another coordinator leads: every node's hello is answered with the leader's address, and
/// every enrollment is refused naming it (the node tries its next address), under the same bounds
/// as the leader's, until `stop` changes. The endpoint stays open, for when this one leads.
pub async fn serve_following(
    endpoint: quinn::Endpoint,
    leader: watch::Receiver<crate::follow::LeaderView>,
    limits: AdmissionLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let gate = Arc::new(Gate::default());
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        let Some((incoming, pass)) = admit(incoming, &gate, limits, &metrics) else { continue };
        let (metrics, leader) = (metrics.clone(), leader.borrow().clone());
        tokio::spawn(
            async move {
                let Some(conn) = handshake(incoming, &metrics).await else { return };
                let _pass = pass;
                let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(ENROLL_READ_TIMEOUT, conn.accept_bi()).await
                else {
                    return refuse(&conn, &metrics, close_code::PROTOCOL, "no stream opened", "timeout");
                };
                let why = match &leader {
                    Ok(leader) => format!("this coordinator follows; the leader is at {}", leader.quic),
                    Err(why) => format!("this coordinator follows, and no leader is known: {why}"),
                };
                let refusal = Refusal { code: RefusalCode::NotLeader, message: why.clone() };
                match pki::negotiated_alpn(&conn).as_deref() {
                    Some(ALPN_ENROLL) => {
                        let answer = match &leader {
                            Ok(leader) => EnrollResponse::FollowLeader { leader: leader.quic.clone() },
                            Err(_) => EnrollResponse::Refused(refusal),
                        };
                        let _ = wire::write_frame(&mut send, &answer).await;
                    }
                    Some(ALPN_LINK) if pki::peer_certificates(&conn).is_some() => {
                        // The hello is read (bounded, as on the leader) so that the answer is
                        // the answer to it.
                        if let Err((code, refusal, label)) =
                            read_opening::<Hello, MAX_FRAME_LEN>(&mut recv, FIRST_MESSAGE_TIMEOUT).await
                        {
                            let _ = wire::write_frame(&mut send, &CoordinatorMessage::Refused(refusal.clone())).await;
                            return refuse_after_answer(&conn, send, &metrics, code, &refusal.message, label).await;
                        }
                        let answer = match leader {
                            Ok(leader) => CoordinatorMessage::FollowLeader { leader: leader.quic },
                            Err(_) => CoordinatorMessage::Refused(refusal),
                        };
                        let _ = wire::write_frame(&mut send, &answer).await;
                    }
                    _ => {
                        return refuse(
                            &conn,
                            &metrics,
                            close_code::UNAUTHORIZED,
                            "a client certificate is required on hexa/1: enroll the node first",
                            "certificate_required",
                        );
                    }
                }
                refuse_after_answer(&conn, send, &metrics, close_code::DONE, &why, "not_leader").await;
            }
            .instrument(info_span!("connection", %peer)),
        );
    }
}

fn refuse(conn: &quinn::Connection, metrics: &Metrics, code: u32, reason: &str, label: &str) {
    metrics.refused(label);
    warn!(reason, "refused");
    conn.close(code.into(), reason.as_bytes());
}

/// Refuses after a refusal frame was written on `send`: closing at once could overtake the frame,
/// so the peer gets a moment to read it and close first.
async fn refuse_after_answer(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    metrics: &Metrics,
    code: u32,
    reason: &str,
    label: &str,
) {
    metrics.refused(label);
    if label == "not_leader" {
        // Every agent of a fleet meets a follower in turn: not worth a warning each.
        debug!(reason, "sent to the leader");
    } else {
        warn!(reason, "refused");
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(code.into(), reason.as_bytes());
}

/// Reads the first message of a stream, which must open with our protocol version and fit in
/// `LIMIT` bytes, within `within`.
async fn read_opening<T: serde::de::DeserializeOwned, const LIMIT: usize>(
    recv: &mut quinn::RecvStream,
    within: Duration,
) -> Result<T, (u32, Refusal, &'static str)> {
    let protocol = |label: &'static str, message: String| {
        (close_code::PROTOCOL, Refusal { code: RefusalCode::MalformedRequest, message }, label)
    };
    let payload = match tokio::time::timeout(within, wire::read_payload_within(recv, LIMIT)).await {
        Err(_) => return Err(protocol("timeout", format!("no opening message within {}s", within.as_secs()))),
        Ok(Err(e)) => return Err(protocol(frame_label(&e), e.to_string())),
        Ok(Ok(None)) => return Err(protocol("empty", "stream closed before the opening message".into())),
        Ok(Ok(Some(payload))) => payload,
    };
    decode_opening::<T, LIMIT>(&payload)
}

/// Decodes the payload of a stream's first message as [`read_opening`] does: a peer speaking
/// another protocol version is told so, anything else that is not a whole `T` within `LIMIT`
/// bytes is malformed. Returns the close code, the refusal to answer with and the metric label.
pub fn decode_opening<T: serde::de::DeserializeOwned, const LIMIT: usize>(
    payload: &[u8],
) -> Result<T, (u32, Refusal, &'static str)> {
    let protocol = |label: &'static str, message: String| {
        (close_code::PROTOCOL, Refusal { code: RefusalCode::MalformedRequest, message }, label)
    };
    if let Some(version) = wire::peek_protocol_version(payload) {
        if version != PROTOCOL_VERSION {
            let message = format!(
                "protocol version {version} is not supported: this coordinator speaks version {PROTOCOL_VERSION}; install a matching agent"
            );
            return Err((
                close_code::UNSUPPORTED_VERSION,
                Refusal { code: RefusalCode::UnsupportedVersion, message },
                "unsupported_version",
            ));
        }
    }
    wire::decode_payload_within::<T, LIMIT>(payload).map_err(|e| protocol(frame_label(&e), e.to_string()))
}

fn frame_label(e: &FrameError) -> &'static str {
    match e {
        FrameError::TooLarge { .. } => "frame_too_large",
        FrameError::TrailingBytes { .. } => "trailing_bytes",
        FrameError::Decode(_) => "malformed_frame",
        FrameError::Truncated { .. } => "truncated_frame",
        FrameError::Io(_) | FrameError::Encode(_) => "stream_error",
    }
}

async fn serve_enrollment(conn: quinn::Connection, ctx: &LinkContext, pass: Pass) {
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(ENROLL_READ_TIMEOUT, conn.accept_bi()).await else {
        debug!("enrollment connection opened no stream");
        return;
    };
    let req: EnrollRequest = match read_opening::<_, MAX_ENROLL_FRAME_LEN>(&mut recv, ENROLL_READ_TIMEOUT).await {
        Ok(req) => req,
        Err((code, refusal, label)) => {
            let _ = wire::write_frame(&mut send, &EnrollResponse::Refused(refusal.clone())).await;
            return refuse_after_answer(&conn, send, &ctx.metrics, code, &refusal.message, label).await;
        }
    };
    let token_id = req.token.split('.').next().unwrap_or_default().to_string();
    let span = info_span!("enroll", token_id, hostname = %req.hostname);
    // The enrollment writes to the state database and signs: off the async worker threads.
    let inventory = ctx.inventory.clone();
    let enroll_span = span.clone();
    let outcome = tokio::task::spawn_blocking(move || enroll_span.in_scope(|| inventory.enroll(&req))).await;
    let outcome = outcome.unwrap_or_else(|e| {
        Err(Refusal { code: RefusalCode::Internal, message: format!("enrollment failed inside the coordinator: {e}") })
    });
    let response = match outcome {
        Ok(enrolled) => {
            ctx.metrics.enrollments_accepted.inc();
            EnrollResponse::Accepted(enrolled)
        }
        Err(refusal) => {
            ctx.metrics.refused(&format!("{:?}", refusal.code).to_lowercase());
            warn!(parent: &span, code = ?refusal.code, reason = %refusal.message, "enrollment refused");
            EnrollResponse::Refused(refusal)
        }
    };
    if let Err(e) = wire::write_frame(&mut send, &response).await {
        warn!(error = %e, "cannot send enrollment response");
    }
    let _ = send.finish();
    // Answered: what is left is waiting for the peer to go, which costs the gate nothing.
    drop(pass);
    // Give the response time to reach the agent before the connection goes; the agent closes first.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

async fn serve_link(conn: quinn::Connection, ctx: &LinkContext, pass: Pass, mut shutdown: watch::Receiver<bool>) {
    let metrics = &ctx.metrics;
    let Some(chain) = pki::peer_certificates(&conn) else {
        return refuse(
            &conn,
            metrics,
            close_code::UNAUTHORIZED,
            "a client certificate is required on hexa/1: enroll the node first",
            "certificate_required",
        );
    };
    let identity = match chain.first().map(|der| pki::cert_identity(der)) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return refuse(&conn, metrics, close_code::UNAUTHORIZED, &e.to_string(), "bad_certificate"),
        None => return refuse(&conn, metrics, close_code::UNAUTHORIZED, "empty certificate chain", "bad_certificate"),
    };
    let node = identity.common_name.clone();
    let span = info_span!("link", %node);
    async {
        let admission = match ctx.inventory.admit_link(&node, &identity.serial, conn.remote_address().ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let label = match refusal.code {
                    RefusalCode::CertificateRevoked => "certificate_revoked",
                    _ => "certificate_superseded",
                };
                // Answer the hello with the refusal, so that the agent knows retrying cannot help
                // (an agent opens its stream with the hello at once; a peer that does not is just
                // closed with the reason).
                let Ok(Ok((mut send, _recv))) = tokio::time::timeout(Duration::from_secs(2), conn.accept_bi()).await
                else {
                    return refuse(&conn, metrics, close_code::UNAUTHORIZED, &refusal.message, label);
                };
                let _ = wire::write_frame(&mut send, &CoordinatorMessage::Refused(refusal.clone())).await;
                return refuse_after_answer(&conn, send, metrics, close_code::UNAUTHORIZED, &refusal.message, label)
                    .await;
            }
        };
        // Authenticated: the node no longer counts against the bounds on strangers.
        drop(pass);
        metrics.links_open.fetch_add(1, Ordering::Relaxed);
        let peer = LinkPeer { node: &node, serial: &identity.serial };
        run_link(&conn, ctx, peer, admission, &mut shutdown).await;
        metrics.links_open.fetch_sub(1, Ordering::Relaxed);
        ctx.inventory.link_closed(&node);
    }
    .instrument(span)
    .await
}

/// Who is on the other end of a link: the node and the certificate it presented.
#[derive(Debug, Clone, Copy)]
struct LinkPeer<'a> {
    node: &'a str,
    serial: &'a str,
}

async fn run_link(
    conn: &quinn::Connection,
    ctx: &LinkContext,
    peer: LinkPeer<'_>,
    admission: Admission,
    shutdown: &mut watch::Receiver<bool>,
) {
    let node = peer.node;
    let Admission { pool, spec: mut spec_rx, auth: mut auth_rx } = admission;
    let is_server = pool == hexa_shared::names::Pool::Server;
    let metrics = &ctx.metrics;
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, conn.accept_bi()).await else {
        return refuse(conn, metrics, close_code::PROTOCOL, "no control stream opened within 10s", "timeout");
    };
    let hello: Hello = match read_opening::<_, MAX_FRAME_LEN>(&mut recv, FIRST_MESSAGE_TIMEOUT).await {
        Ok(hello) => hello,
        Err((code, refusal, label)) => {
            let _ = wire::write_frame(&mut send, &CoordinatorMessage::Refused(refusal.clone())).await;
            return refuse_after_answer(conn, send, metrics, code, &refusal.message, label).await;
        }
    };
    if hello.node_name != node {
        warn!(claimed = %hello.node_name, "agent calls itself by another name; its certificate decides");
    }
    info!(agent_version = %hello.agent_version, applied_generation = hello.applied_generation, "node connected");
    if let Err(e) = ctx.inventory.catch_up_generation(node, hello.applied_generation) {
        warn!(error = %e, "cannot move the node's generation past the one it applied");
    }
    let welcome = CoordinatorMessage::Welcome(Welcome {
        node_name: node.to_string(),
        pool,
        report_interval_ms: ctx.report_interval.as_millis() as u64,
    });
    if wire::write_frame(&mut send, &welcome).await.is_err() {
        return;
    }
    // The first spec goes out at once unless the agent already has it.
    let mut sent_generation = hello.applied_generation;
    // Only a `server` node holds its cluster's admin kubeconfig: only its link is asked for access.
    let mut access = is_server.then(|| ctx.access.register(node, conn.remote_address().ip()));
    let mut access_pending: Vec<crate::hostcluster::access::AccessReply> = Vec::new();

    // Frames are read in their own task: a partially read frame must never be dropped by select!.
    // The guard stops the task when this function returns.
    let (mut msg_rx, _reader) = wire::spawn_reader::<AgentMessage, _>(recv);

    let mut last_heard = tokio::time::Instant::now();
    let mut watchdog = tokio::time::interval(ctx.silence_limit / 4);
    loop {
        let spec = spec_rx.borrow_and_update().clone();
        if spec.generation > sent_generation {
            if wire::write_frame(&mut send, &CoordinatorMessage::Spec(Box::new(spec.clone()))).await.is_err() {
                break;
            }
            debug!(generation = spec.generation, "spec sent");
            sent_generation = spec.generation;
        }
        tokio::select! {
            msg = msg_rx.recv() => match msg {
                None => {
                    info!("node disconnected");
                    break;
                }
                Some(Err(e)) => {
                    refuse(conn, metrics, close_code::PROTOCOL, &format!("closing link: {e}"), frame_label(&e));
                    break;
                }
                Some(Ok(AgentMessage::HostAccess(result))) => {
                    last_heard = tokio::time::Instant::now();
                    if access_pending.is_empty() {
                        warn!("the node sent host-cluster access nobody asked for; ignored");
                    }
                    for reply in access_pending.drain(..) {
                        let _ = reply.send(result.clone());
                    }
                }
                Some(Ok(msg)) => {
                    last_heard = tokio::time::Instant::now();
                    let reply = handle(ctx, peer, msg);
                    if let Some(reply) = reply {
                        if wire::write_frame(&mut send, &reply).await.is_err() {
                            break;
                        }
                    }
                }
            },
            Some(reply) = async {
                match &mut access {
                    Some((_, requests)) => requests.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if access_pending.is_empty()
                    && wire::write_frame(&mut send, &CoordinatorMessage::HostAccessRequest).await.is_err()
                {
                    break;
                }
                info!("asked the node for host-cluster access");
                access_pending.push(reply);
            },
            changed = spec_rx.changed() => if changed.is_err() { break },
            changed = auth_rx.changed() => {
                // Re-enrolled, renewed and retired, revoked, or deleted: a certificate that no longer
                // opens a link does not keep the one it has.
                let refused = match changed {
                    Ok(()) => auth_rx.borrow_and_update().refuses(node, peer.serial),
                    Err(_) => Some(Refusal {
                        code: RefusalCode::CertificateSuperseded,
                        message: format!("node {node} was deleted from the inventory"),
                    }),
                };
                if let Some(refusal) = refused {
                    refuse(conn, metrics, close_code::UNAUTHORIZED, &refusal.message, "link_closed_superseded");
                    break;
                }
            },
            _ = watchdog.tick() => if last_heard.elapsed() >= ctx.silence_limit {
                let reason = format!("nothing received for {}ms", last_heard.elapsed().as_millis());
                warn!(%reason, "closing silent link");
                conn.close(close_code::PROTOCOL.into(), reason.as_bytes());
                break;
            },
            _ = shutdown.changed() => {
                conn.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
                break;
            }
            reason = conn.closed() => {
                info!(%reason, "link closed");
                break;
            }
        }
    }
}

fn handle(ctx: &LinkContext, peer: LinkPeer<'_>, msg: AgentMessage) -> Option<CoordinatorMessage> {
    let node = peer.node;
    match msg {
        AgentMessage::Report(report) => {
            let seq = report.seq;
            if report.node_name != node {
                debug!(claimed = %report.node_name, "report claims another name; recorded for the certificate's node");
            }
            ctx.inventory.record_report(node, *report);
            Some(CoordinatorMessage::ReportAck { seq })
        }
        AgentMessage::Applied(status) => {
            debug!(generation = status.generation, "node applied spec");
            ctx.inventory.record_applied(node, status);
            None
        }
        // Answered in the link's loop, where the requests wait.
        AgentMessage::HostAccess(_) => None,
        AgentMessage::RenewCertificate { csr_der } => Some(match ctx.inventory.renew(node, peer.serial, &csr_der) {
            Ok(cert_chain_der) => CoordinatorMessage::CertificateRenewed { cert_chain_der },
            Err(refusal) => {
                ctx.metrics.refused("renewal_refused");
                warn!(reason = %refusal.message, "certificate renewal refused");
                CoordinatorMessage::RenewalRefused(refusal)
            }
        }),
    }
}
