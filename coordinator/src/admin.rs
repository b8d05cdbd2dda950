//! The admin HTTP API (`7080/tcp`): bearer-token authenticated JSON, errors as
//! `{"error": {"code", "message"}}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use hexa_shared::names::Pool;

use crate::bootstrap::{hashes_equal, sha256_hex};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::placement::PlacementError;
use crate::store::Store;
use crate::tenants::{Tenants, TenantsError};
use crate::tokens::{self, TokenError};
use hexa_shared::tenant::{NodeClass, Plan};

/// Largest request body accepted; every request here is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

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
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(e.status(), "bad_request", e.body_text())
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NotFound(_) => ApiError::not_found(e.to_string()),
            TokenError::AlreadyUsed { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            TokenError::BadTtl(_) | TokenError::BadClass(_) => ApiError::bad_request(e.to_string()),
            TokenError::Store(e) => {
                tracing::error!(error = %e, "state database failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the state database failed; see the coordinator log",
                )
            }
        }
    }
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "admin request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the coordinator failed; see its log")
}

impl From<TenantsError> for ApiError {
    fn from(e: TenantsError) -> Self {
        let message = e.to_string();
        match e {
            TenantsError::NotFound(_) | TenantsError::NoNode(_) => ApiError::not_found(message),
            TenantsError::StillDeleting(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            TenantsError::Store(e) => internal(&e),
            TenantsError::Placement(p) => match p {
                PlacementError::InvalidPlan { .. } => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_plan", message)
                }
                PlacementError::ShareTooLarge { .. } => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unplaceable", message)
                }
                PlacementError::TenantExists { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
                PlacementError::UnknownTenant { .. } | PlacementError::UnknownNode { .. } => {
                    ApiError::not_found(message)
                }
                PlacementError::NoSharedNodes { .. }
                | PlacementError::TooFewNodes { .. }
                | PlacementError::NoRoom { .. } => {
                    ApiError::new(StatusCode::CONFLICT, "insufficient_capacity", message)
                }
                PlacementError::InvalidConfig(_) | PlacementError::DuplicateNode { .. } => internal(&p),
            },
        }
    }
}

pub fn router(ctx: Arc<AdminContext>) -> Router {
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node).delete(delete_node))
        .route("/v1/nodes/{name}/revoke", post(revoke_node))
        .route("/v1/nodes/{name}/reenroll", post(reenroll_node))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/nodes/{name}/cordon", post(cordon_node))
        .route("/v1/nodes/{name}/uncordon", post(uncordon_node))
        .route("/v1/nodes/{name}/drain", post(drain_node))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", get(get_tenant).patch(patch_tenant).delete(delete_tenant))
        .route("/v1/provisioning", get(list_provisioning))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), require_bearer));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/openapi.json", get(openapi))
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

async fn require_bearer(
    State(ctx): State<Arc<AdminContext>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if hashes_equal(&sha256_hex(token), &ctx.admin_token_sha256) => next.run(request).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is not valid").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>`; the admin token is in <state-dir>/admin.token",
        )
        .into_response(),
    }
}

async fn metrics(State(ctx): State<Arc<AdminContext>>) -> impl IntoResponse {
    let body = ctx.metrics.render(&ctx.inventory.health_counts());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn list_nodes(State(ctx): State<Arc<AdminContext>>) -> impl IntoResponse {
    Json(ctx.inventory.list())
}

async fn get_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    ctx.inventory.get(&name).map(Json).ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))
}

/// Deletes a node: revoked, its shares moved, its host-cluster marks removed, forgotten.
async fn delete_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.delete_node(&name).await?))
}

/// Revokes a node's certificates and closes its link; the record stays.
async fn revoke_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    ctx.inventory
        .revoke(&name)
        .map_err(|e| internal(&e))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ReenrollRequest {
    /// e.g. `1h`, `30m`; the coordinator's `token_ttl` when absent.
    #[serde(default)]
    ttl: Option<String>,
}

/// Mints the one kind of token that enrolls an existing node again (as itself, in its pool).
async fn reenroll_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
    body: Option<Json<ReenrollRequest>>,
) -> Result<impl IntoResponse, ApiError> {
    let req = body.map(|Json(req)| req).unwrap_or_default();
    let ttl = parse_ttl(req.ttl.as_deref(), ctx.default_token_ttl)?;
    let record = ctx.inventory.record(&name).ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))?;
    let created = tokens::create_reenroll(&ctx.store, &record, ttl)?;
    Ok((StatusCode::CREATED, Json(created)))
}

fn parse_ttl(text: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::bad_request(format!("ttl {text:?} is not a duration such as 30m or 1h: {e}"))),
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CreateTokenRequest {
    /// `server`, `shared` or `dedicated:<tenant>`.
    pool: String,
    /// e.g. `1h`, `30m`; the coordinator's `token_ttl` when absent.
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: String,
    /// Node class for `dedicated:<tenant>` pools.
    #[serde(default)]
    node_class: Option<String>,
}

async fn create_token(
    State(ctx): State<Arc<AdminContext>>,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(req) = body?;
    let pool: Pool =
        req.pool.parse().map_err(|e: hexa_shared::names::NameError| ApiError::bad_request(e.to_string()))?;
    let ttl = parse_ttl(req.ttl.as_deref(), ctx.default_token_ttl)?;
    let request = tokens::TokenRequest { pool, ttl, description: req.description, node_class: req.node_class };
    let created = tokens::create(&ctx.store, request, &ctx.node_classes)?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_tokens(State(ctx): State<Arc<AdminContext>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(tokens::list(&ctx.store)?))
}

async fn revoke_token(
    State(ctx): State<Arc<AdminContext>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(tokens::revoke(&ctx.store, &id)?))
}

async fn cordon_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.cordon(&name, true).await?))
}

async fn uncordon_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.cordon(&name, false).await?))
}

async fn drain_node(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.drain(&name).await?))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CreateTenantRequest {
    name: String,
    plan: Plan,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PatchTenantRequest {
    plan: Plan,
}

async fn create_tenant(
    State(ctx): State<Arc<AdminContext>>,
    body: Result<Json<CreateTenantRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(ctx.tenants.create(&req.name, req.plan).await?)))
}

async fn list_tenants(State(ctx): State<Arc<AdminContext>>) -> impl IntoResponse {
    Json(ctx.tenants.list().await)
}

async fn get_tenant(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.get(&name).await?))
}

async fn patch_tenant(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
    body: Result<Json<PatchTenantRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(req) = body?;
    Ok(Json(ctx.tenants.change_plan(&name, req.plan).await?))
}

async fn delete_tenant(
    State(ctx): State<Arc<AdminContext>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ctx.tenants.delete(&name).await?))
}

async fn list_provisioning(State(ctx): State<Arc<AdminContext>>) -> impl IntoResponse {
    Json(ctx.tenants.provisioning().await)
}

async fn openapi() -> impl IntoResponse {
    Json(openapi_document())
}

/// The OpenAPI description of this API.
pub fn openapi_document() -> serde_json::Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let errors = json!({
        "401": {"description": "missing or wrong bearer token", "content": {"application/json": {"schema": error}}},
    });
    let with = |extra: serde_json::Value| {
        let mut responses = errors.clone();
        if let (Some(map), Some(extra)) = (responses.as_object_mut(), extra.as_object()) {
            map.extend(extra.clone());
        }
        responses
    };
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Hexabase coordinator admin API", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "Node": {"type": "object", "required": ["name", "pool", "health", "connected"], "properties": {
                    "name": {"type": "string"}, "pool": {"type": "string"},
                    "health": {"type": "string", "enum": ["Pending", "Ready", "Unreachable", "Lost"]},
                    "connected": {"type": "boolean"}, "last_report_age_ms": {"type": "integer", "nullable": true},
                    "capacity": {"type": "object", "nullable": true}, "allocatable": {"type": "object", "nullable": true},
                    "usage": {"type": "object", "nullable": true}}},
                "TokenRequest": {"type": "object", "required": ["pool"], "additionalProperties": false, "properties": {
                    "pool": {"type": "string", "example": "shared"}, "ttl": {"type": "string", "example": "1h"},
                    "description": {"type": "string"}}},
                "Plan": {"type": "object", "required": ["kind"], "properties": {
                    "kind": {"type": "string", "enum": ["shared", "dedicated"]},
                    "cpu_millis": {"type": "integer"}, "memory_bytes": {"type": "integer"}, "pods": {"type": "integer"},
                    "replicas": {"type": "integer", "enum": [1, 3]}, "spread": {"type": "integer"},
                    "node_class": {"type": "string"}, "count": {"type": "integer"}}},
                "TenantRequest": {"type": "object", "required": ["name", "plan"], "additionalProperties": false, "properties": {
                    "name": {"type": "string", "maxLength": 40}, "plan": {"$ref": "#/components/schemas/Plan"}}},
                "Token": {"type": "object", "properties": {"id": {"type": "string"}, "pool": {"type": "string"},
                    "status": {"type": "string", "enum": ["active", "expired", "used", "revoked"]},
                    "expires_at_unix": {"type": "integer"}}},
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
            "/metrics": {"get": {"responses": with(json!({"200": {"description": "Prometheus text"}}))}},
            "/v1/nodes": {"get": {"responses": with(json!({"200": {"description": "all nodes",
                "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}}}}))}},
            "/v1/nodes/{name}": {"get": {
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "the node", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}},
                    "404": {"description": "no such node", "content": {"application/json": {"schema": error}}}}))},
                "delete": {
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "deleted: revoked, shares moved, forgotten; the node as last seen", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}},
                    "404": {"description": "no such node", "content": {"application/json": {"schema": error}}}}))}},
            "/v1/nodes/{name}/revoke": {"post": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "the node, its certificates revoked and its link closed"},
                    "404": {"description": "no such node", "content": {"application/json": {"schema": error}}}}))}},
            "/v1/nodes/{name}/reenroll": {"post": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false,
                    "properties": {"ttl": {"type": "string", "example": "1h"}}}}}},
                "responses": with(json!({"201": {"description": "a token that enrolls this node again, shown once"},
                    "400": {"description": "bad ttl", "content": {"application/json": {"schema": error}}},
                    "404": {"description": "no such node", "content": {"application/json": {"schema": error}}}}))}},
            "/v1/tokens": {
                "get": {"responses": with(json!({"200": {"description": "tokens, without secrets"}}))},
                "post": {"requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}}}},
                    "responses": with(json!({"201": {"description": "the token, shown once"},
                        "400": {"description": "bad pool or ttl", "content": {"application/json": {"schema": error}}}}))}},
            "/v1/nodes/{name}/cordon": {"post": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "the node, cordoned: no new shares"}, "404": {"description": "no such node"}}))}},
            "/v1/nodes/{name}/uncordon": {"post": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "the node, schedulable again"}, "404": {"description": "no such node"}}))}},
            "/v1/nodes/{name}/drain": {"post": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "the node, cordoned, its shares moved off"}, "404": {"description": "no such node"}}))}},
            "/v1/tenants": {
                "get": {"responses": with(json!({"200": {"description": "all tenants with phase, conditions and placement"}}))},
                "post": {"requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TenantRequest"}}}},
                    "responses": with(json!({"201": {"description": "the tenant, placed"},
                        "409": {"description": "name taken, or not enough capacity (the message says what is missing)", "content": {"application/json": {"schema": error}}},
                        "422": {"description": "invalid name or plan, or a share larger than any node", "content": {"application/json": {"schema": error}}}}))}},
            "/v1/tenants/{name}": {
                "get": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "responses": with(json!({"200": {"description": "the tenant"}, "404": {"description": "no such tenant"}}))},
                "patch": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["plan"],
                        "properties": {"plan": {"$ref": "#/components/schemas/Plan"}}}}}},
                    "responses": with(json!({"200": {"description": "the tenant, re-placed"}, "404": {"description": "no such tenant"},
                        "409": {"description": "not enough capacity"}, "422": {"description": "invalid plan"}}))},
                "delete": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "responses": with(json!({"200": {"description": "deleted; its last state"}, "404": {"description": "no such tenant"}}))}},
            "/v1/provisioning": {"get": {"responses": with(json!({"200": {"description": "outstanding dedicated node requests"}}))}},
            "/v1/tokens/{id}": {"delete": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": {"description": "revoked"},
                    "404": {"description": "no such token", "content": {"application/json": {"schema": error}}},
                    "409": {"description": "already used", "content": {"application/json": {"schema": error}}}}))}},
        }
    })
}
