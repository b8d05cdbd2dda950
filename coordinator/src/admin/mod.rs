//! The admin HTTP API (`7080/tcp`): bearer-token authenticated JSON, errors as
//! `{"error": {"code", "message"}}`, described by the OpenAPI document served at
//! `/v1/openapi.json`.
//!
//! The document is generated from the handlers, so it cannot drift from them: each handler carries
//! a `#[utoipa::path]` naming its method, path, request body type and every status it returns
//! with the body type, and its module's `routes()` registers it with `routes!`, which adds the
//! route and its documentation in one step. To add an endpoint:
//!
//! 1. write the handler in the module of its resource (`nodes`, `tokens`, `tenants`), with a
//!    `#[utoipa::path(...)]` listing its own statuses (200/201 and what it answers itself: 404,
//!    409, 422...); request and response types derive `utoipa::ToSchema`;
//! 2. add it to that module's `routes()` (handlers of one path go in one `routes!`);
//! 3. exercise it in `tests/tests/admin_api.rs`, whose contract test checks every response
//!    against this document and fails for an operation it never saw succeed.
//!
//! Statuses every operation shares (401 without the bearer token, 405, 500, and 400/413/415/422
//! for a JSON body) are added to each operation by `openapi::common_responses`.

mod error;
mod follower;
mod nodes;
mod openapi;
mod tenants;
mod tokens;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::bootstrap::{hashes_equal, sha256_hex};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tenants::Tenants;
use hexa_shared::tenant::NodeClass;

pub use error::{ApiError, ErrorBody, ErrorCode, ErrorDetail, MAX_MESSAGE, api_terms};
pub use follower::{FollowerContext, router as follower_router};

/// Largest request body accepted; every request here is a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub struct AdminContext {
    pub inventory: Arc<Inventory>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// sha256 (hex) of the admin bearer token.
    pub admin_token_sha256: String,
    pub default_token_ttl: Duration,
    pub tenants: Arc<Tenants>,
    pub node_classes: Vec<NodeClass>,
    /// The Proxmox provisioner, when configured: `/v1/provisioning` lists its VMs.
    pub provisioner: Option<Arc<crate::proxmox::Provisioner>>,
}

type Ctx = Arc<AdminContext>;

/// The API's routes with their documentation: those open to anyone, and those behind the bearer
/// token. [`router`] serves them; [`openapi_document`] describes them.
fn api() -> (OpenApiRouter<Ctx>, OpenApiRouter<Ctx>) {
    let open = OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(openapi_json));
    let authed = OpenApiRouter::new()
        .routes(routes!(metrics))
        .merge(nodes::routes())
        .merge(tokens::routes())
        .merge(tenants::routes());
    (open, authed)
}

pub fn router(ctx: Arc<AdminContext>) -> Router {
    let (open, authed) = api();
    let authed = authed.route_layer(middleware::from_fn_with_state(ctx.clone(), require_bearer));
    let (router, _) = OpenApiRouter::new().merge(open).merge(authed).split_for_parts();
    router
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        // After every route: a known path with another method answers 405 with the JSON error
        // (axum keeps the Allow header), before authentication as before.
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

/// The OpenAPI 3.1 description of this API, generated from the handlers and their types.
pub fn openapi_document() -> serde_json::Value {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    DOCUMENT
        .get_or_init(|| {
            let (open, authed) = api();
            let mut document = openapi::ApiDoc::openapi();
            document.merge(OpenApiRouter::new().merge(open).merge(authed).into_openapi());
            openapi::common_responses(&mut document);
            // Serialising utoipa's own types cannot fail (string keys, no foreign Serialize);
            // the fallback would serve `null` rather than take the API down.
            serde_json::to_value(&document).unwrap_or_default()
        })
        .clone()
}

async fn require_bearer(State(ctx): State<Ctx>, headers: HeaderMap, request: Request, next: Next) -> Response {
    match check_bearer(&headers, Some(&ctx.admin_token_sha256)) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The request's bearer token against the admin token's hash (`None`: no token is valid).
fn check_bearer(headers: &HeaderMap, admin_token_sha256: Option<&str>) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 7235).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match (presented, admin_token_sha256) {
        (Some(token), Some(hash)) if hashes_equal(&sha256_hex(token), hash) => Ok(()),
        (Some(_), _) => Err(ApiError::unauthorized("the bearer token is not valid")),
        (None, _) => Err(ApiError::unauthorized(
            "missing `Authorization: Bearer <token>`; the admin token is in <state-dir>/admin.token",
        )),
    }
}

/// Liveness: answers while the coordinator runs. Needs no token.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "alive", body = String, content_type = "text/plain", example = "ok\n")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// This document, with the node classes this coordinator is configured with. Needs no token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "the OpenAPI document of this API", body = serde_json::Value)))]
async fn openapi_json(State(ctx): State<Ctx>) -> impl IntoResponse {
    let mut document = openapi_document();
    openapi::with_node_classes(&mut document, &ctx.node_classes);
    Json(document)
}

/// Prometheus metrics: nodes by health, reports and their lag, placements and their latency,
/// tenants by phase, provisioning VMs by state, link reconnects, refusals, and what each node's
/// agent reports of its isolation (README, "Metrics").
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String,
        content_type = "text/plain")))]
async fn metrics(State(ctx): State<Ctx>) -> impl IntoResponse {
    let mut tenants = std::collections::BTreeMap::new();
    for tenant in ctx.tenants.list().await {
        *tenants.entry(tenant.phase).or_default() += 1;
    }
    let vms = ctx.provisioner.as_ref().map(|p| {
        let mut vms = std::collections::BTreeMap::new();
        for record in p.records().unwrap_or_default() {
            *vms.entry(record.state).or_default() += 1;
        }
        vms
    });
    let fleet = crate::metrics::Fleet {
        health: ctx.inventory.health_counts(),
        tenants,
        vms,
        nodes: ctx.inventory.node_figures(),
    };
    let body = ctx.metrics.render(&fleet);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

#[cfg(test)]
mod tests;
