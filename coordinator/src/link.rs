//! The coordinator's QUIC endpoint: enrollment on `hexa-enroll/1` and node links on `hexa/1`.
//!
//! Each connection runs in its own task, so one misbehaving peer (bad frame, wrong version, no
//! certificate) is closed with a reason and logged while every other node keeps being served.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use hexa_shared::pki;
use hexa_shared::proto::{
    ALPN_ENROLL, ALPN_LINK, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Hello, PROTOCOL_VERSION,
    Refusal, RefusalCode, Welcome, close_code,
};
use hexa_shared::wire::{self, FrameError};

use crate::inventory::Inventory;
use crate::metrics::Metrics;

/// A peer gets this long to finish the handshake and send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LinkContext {
    pub inventory: Arc<Inventory>,
    pub metrics: Arc<Metrics>,
    pub report_interval: Duration,
    /// A link with nothing received for this long is closed: the node is Unreachable by then, and
    /// a peer that was killed never says goodbye.
    pub silence_limit: Duration,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<LinkContext>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let peer = incoming.remote_address();
        tokio::spawn(
            async move {
                let conn = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        ctx.metrics.handshake_failures.inc();
                        warn!(error = %e, "handshake refused");
                        return;
                    }
                    Err(_) => {
                        ctx.metrics.handshake_failures.inc();
                        warn!("handshake timed out");
                        return;
                    }
                };
                match pki::negotiated_alpn(&conn).as_deref() {
                    Some(ALPN_ENROLL) => serve_enrollment(conn, &ctx).await,
                    Some(ALPN_LINK) => serve_link(conn, &ctx, shutdown).await,
                    // rustls refuses unknown ALPNs during the handshake; this is belt and braces.
                    _ => conn.close(close_code::PROTOCOL.into(), b"unknown application protocol"),
                }
            }
            .instrument(info_span!("connection", %peer)),
        );
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
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
    warn!(reason, "refused");
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(code.into(), reason.as_bytes());
}

/// Reads the first message of a stream, which must open with our protocol version.
async fn read_opening<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, (u32, Refusal, &'static str)> {
    let protocol = |label: &'static str, message: String| {
        (close_code::PROTOCOL, Refusal { code: RefusalCode::MalformedRequest, message }, label)
    };
    let payload = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, wire::read_payload(recv)).await {
        Err(_) => return Err(protocol("timeout", "no opening message within 10s".into())),
        Ok(Err(e)) => return Err(protocol(frame_label(&e), e.to_string())),
        Ok(Ok(None)) => return Err(protocol("empty", "stream closed before the opening message".into())),
        Ok(Ok(Some(payload))) => payload,
    };
    if let Some(version) = wire::peek_protocol_version(&payload) {
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
    wire::decode_payload(&payload).map_err(|e| protocol(frame_label(&e), e.to_string()))
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

async fn serve_enrollment(conn: quinn::Connection, ctx: &LinkContext) {
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, conn.accept_bi()).await else {
        debug!("enrollment connection opened no stream");
        return;
    };
    let req: EnrollRequest = match read_opening(&mut recv).await {
        Ok(req) => req,
        Err((code, refusal, label)) => {
            let _ = wire::write_frame(&mut send, &EnrollResponse::Refused(refusal.clone())).await;
            return refuse_after_answer(&conn, send, &ctx.metrics, code, &refusal.message, label).await;
        }
    };
    let token_id = req.token.split('.').next().unwrap_or_default().to_string();
    let span = info_span!("enroll", token_id, hostname = %req.hostname);
    let response = match span.in_scope(|| ctx.inventory.enroll(&req)) {
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
    // Give the response time to reach the agent before the connection goes; the agent closes first.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

async fn serve_link(conn: quinn::Connection, ctx: &LinkContext, mut shutdown: watch::Receiver<bool>) {
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
        let (pool, spec_rx) = match ctx.inventory.admit_link(&node, &identity.serial, conn.remote_address().ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                return refuse(&conn, metrics, close_code::UNAUTHORIZED, &refusal.message, "certificate_superseded");
            }
        };
        metrics.links_open.fetch_add(1, Ordering::Relaxed);
        run_link(&conn, ctx, &node, pool, spec_rx, &mut shutdown).await;
        metrics.links_open.fetch_sub(1, Ordering::Relaxed);
        ctx.inventory.link_closed(&node);
    }
    .instrument(span)
    .await
}

async fn run_link(
    conn: &quinn::Connection,
    ctx: &LinkContext,
    node: &str,
    pool: hexa_shared::names::Pool,
    mut spec_rx: watch::Receiver<hexa_shared::spec::NodeSpec>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let metrics = &ctx.metrics;
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, conn.accept_bi()).await else {
        return refuse(conn, metrics, close_code::PROTOCOL, "no control stream opened within 10s", "timeout");
    };
    let hello: Hello = match read_opening(&mut recv).await {
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

    // Frames are read in their own task: a partially read frame must never be dropped by select!.
    let (msg_tx, mut msg_rx) = mpsc::channel::<Result<AgentMessage, FrameError>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let msg = match wire::read_payload(&mut recv).await {
                Ok(Some(payload)) => wire::decode_payload::<AgentMessage>(&payload),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let failed = msg.is_err();
            if msg_tx.send(msg).await.is_err() || failed {
                break;
            }
        }
    });

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
                Some(Ok(msg)) => {
                    last_heard = tokio::time::Instant::now();
                    let reply = handle(ctx, node, msg);
                    if let Some(reply) = reply {
                        if wire::write_frame(&mut send, &reply).await.is_err() {
                            break;
                        }
                    }
                }
            },
            changed = spec_rx.changed() => if changed.is_err() { break },
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
    reader.abort();
}

fn handle(ctx: &LinkContext, node: &str, msg: AgentMessage) -> Option<CoordinatorMessage> {
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
        AgentMessage::RenewCertificate { csr_der } => Some(match ctx.inventory.renew(node, &csr_der) {
            Ok(cert_chain_der) => CoordinatorMessage::CertificateRenewed { cert_chain_der },
            Err(refusal) => {
                warn!(reason = %refusal.message, "certificate renewal refused");
                CoordinatorMessage::RenewalRefused(refusal)
            }
        }),
    }
}
