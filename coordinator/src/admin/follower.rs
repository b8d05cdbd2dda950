//! The admin API of a coordinator that follows another (several on one etcd). Tenants and tokens
//! are read from the store, which holds what the leader committed; everything else (writes, and
//! the nodes' live state and metrics only the leader holds) is forwarded to the leader and its
//! answer passed back. With no leader to forward to (a failover under way, etcd without a quorum)
//! the answer is `503 unavailable` saying why. Headers say which coordinator answered:
//! `x-hexa-coordinator: follower`, and `x-hexa-leader` where a request was forwarded.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use super::{ApiError, ErrorCode, MAX_BODY};
use crate::follow::LeaderView;
use crate::store::Store;
use hexa_shared::tenant::NodeClass;

/// Set on a request a follower forwards: a follower never forwards it again, so coordinators
/// that disagree for a moment on who leads cannot pass a request around.
pub const FORWARDED: HeaderName = HeaderName::from_static("x-hexa-forwarded");
const ANSWERED_BY: HeaderName = HeaderName::from_static("x-hexa-coordinator");
const LEADER: HeaderName = HeaderName::from_static("x-hexa-leader");
/// A forwarded request gets this long for the leader's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct FollowerContext {
    pub store: Store,
    pub leader: watch::Receiver<LeaderView>,
    pub node_classes: Vec<NodeClass>,
    client: reqwest::Client,
}

impl FollowerContext {
    pub fn new(store: Store, leader: watch::Receiver<LeaderView>, node_classes: Vec<NodeClass>) -> FollowerContext {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FORWARD_TIMEOUT)
            .build()
            .unwrap_or_default();
        FollowerContext { store, leader, node_classes, client }
    }
}

type Ctx = Arc<FollowerContext>;

pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/v1/tenants", get(list_tenants).fallback(forward))
        .route("/v1/tenants/{name}", get(get_tenant).fallback(forward))
        .route("/v1/tokens", get(list_tokens).fallback(forward))
        .fallback(forward)
        .layer(axum::middleware::map_response(|mut response: Response| async move {
            response.headers_mut().insert(ANSWERED_BY, HeaderValue::from_static("follower"));
            response
        }))
        .with_state(ctx)
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, message)
}

/// The bearer token checked against the admin token's hash in the store (the one every
/// coordinator of the store accepts), as the leader checks it.
fn authorize(ctx: &FollowerContext, headers: &HeaderMap) -> Result<(), ApiError> {
    let stored: Option<String> = ctx.store.meta("admin_token_sha256")?;
    super::check_bearer(headers, stored.as_deref())
}

async fn openapi_json(State(ctx): State<Ctx>) -> impl IntoResponse {
    let mut document = super::openapi_document();
    super::openapi::with_node_classes(&mut document, &ctx.node_classes);
    Json(document)
}

/// Runs a blocking store read off the async workers.
async fn read<T: Send + 'static>(
    ctx: &Ctx,
    headers: HeaderMap,
    what: impl FnOnce(&FollowerContext) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let ctx = ctx.clone();
    tokio::task::spawn_blocking(move || {
        authorize(&ctx, &headers)?;
        what(&ctx)
    })
    .await
    .map_err(|e| unavailable(format!("the read failed inside the coordinator: {e}")))?
}

async fn list_tenants(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenants = read(&ctx, headers, |ctx| Ok(ctx.store.tenants()?.into_values().collect::<Vec<_>>())).await?;
    Ok(Json(tenants).into_response())
}

async fn get_tenant(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = read(&ctx, headers, move |ctx| {
        ctx.store.tenants()?.remove(&name).ok_or_else(|| ApiError::not_found(format!("no tenant named {name:?}")))
    })
    .await?;
    Ok(Json(tenant).into_response())
}

async fn list_tokens(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tokens = read(&ctx, headers, |ctx| Ok(crate::tokens::list(&ctx.store)?)).await?;
    Ok(Json(tokens).into_response())
}

/// Passes the request to the leader and its answer back.
async fn forward(State(ctx): State<Ctx>, request: Request) -> Response {
    match forwarded(&ctx, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn forwarded(ctx: &FollowerContext, request: Request) -> Result<Response, ApiError> {
    if request.headers().contains_key(FORWARDED) {
        return Err(unavailable(
            "a coordinator forwarded this request to one that follows too: they disagree on who leads for a \
             moment; retry"
                .into(),
        ));
    }
    let leader = match ctx.leader.borrow().clone() {
        Ok(leader) => leader,
        Err(why) => return Err(unavailable(format!("this coordinator follows, and no leader answers now: {why}"))),
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the {MAX_BODY} bytes the admin API accepts"),
        )
    })?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = ctx.client.request(parts.method, format!("http://{}{path}", leader.admin)).body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            out = out.header(name, value);
        }
    }
    let answer = out.header(FORWARDED, "1").send().await.map_err(|e| {
        unavailable(format!(
            "this coordinator follows, and the leader at {} does not answer ({e}): retry",
            leader.admin
        ))
    })?;
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::ALLOW, header::LOCATION] {
        if let Some(value) = answer.headers().get(&name) {
            headers.insert(name, value.clone());
        }
    }
    let body = answer
        .bytes()
        .await
        .map_err(|e| unavailable(format!("the leader at {} broke off its answer ({e}): retry", leader.admin)))?;
    if let Ok(value) = HeaderValue::from_str(&leader.admin) {
        headers.insert(LEADER, value);
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}
