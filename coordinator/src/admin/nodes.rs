//! `/v1/nodes`: the inventory; cordon, uncordon and drain; revoke, re-enroll and delete.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, Ctx, ErrorBody};
use crate::inventory::NodeView;
use crate::tokens::{self, CreatedToken};

pub(super) fn routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node, delete_node))
        .routes(routes!(cordon_node))
        .routes(routes!(uncordon_node))
        .routes(routes!(drain_node))
        .routes(routes!(revoke_node))
        .routes(routes!(reenroll_node))
}

/// Every node in the inventory, with its health and latest report.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "all nodes", body = Vec<NodeView>)))]
async fn list_nodes(State(ctx): State<Ctx>) -> Json<Vec<NodeView>> {
    Json(ctx.inventory.list())
}

/// One node.
#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn get_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    ctx.inventory.get(&name).map(Json).ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))
}

/// Deletes a node: its certificates are revoked and its link closed, its shares move to other
/// nodes, and it is forgotten, so the host cluster's next pass removes its tenant labels and taints.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "deleted; the node as it was last seen", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn delete_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.delete_node(&name).await?))
}

/// Revokes a node's certificates and closes its link; the record stays, and the node opens no
/// link again until it is re-enrolled.
#[utoipa::path(post, path = "/v1/nodes/{name}/revoke", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node, its certificates revoked", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn revoke_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    ctx.inventory.revoke(&name)?.map(Json).ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))
}

/// A request for a re-enrollment token.
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
#[schema(as = ReenrollRequest)]
struct ReenrollRequest {
    /// How long the token stays valid, a duration such as `30m` or `1h` (1s to 365d); the
    /// coordinator's `token_ttl` when absent.
    #[serde(default)]
    #[schema(pattern = "^[0-9]+ *[a-zA-Z]+( *[0-9]+ *[a-zA-Z]+)*$", example = "1h")]
    ttl: Option<String>,
}

/// Mints the one kind of token that enrolls an existing node again: as itself, in its pool, and
/// for a machine known by its provider identity only with that identity. Its use supersedes the
/// node's certificate at once.
#[utoipa::path(post, path = "/v1/nodes/{name}/reenroll", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    request_body = ReenrollRequest,
    responses(
        (status = 201, description = "the token, shown once", body = CreatedToken),
        (status = 400, description = "the ttl is not valid, or the body is not JSON", body = ErrorBody),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn reenroll_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<ReenrollRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let Path(name) = name?;
    let Json(req) = body?;
    let ttl = tokens::parse_ttl(req.ttl.as_deref(), ctx.default_token_ttl)?;
    let record = ctx.inventory.record(&name).ok_or_else(|| ApiError::not_found(format!("no node named {name:?}")))?;
    Ok((StatusCode::CREATED, Json(tokens::create_reenroll(&ctx.store, &record, ttl)?)))
}

/// Cordons a node: it keeps its shares and gets no new ones.
#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node, cordoned: no new shares", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn cordon_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.cordon(&name, true).await?))
}

/// Makes a cordoned node schedulable again.
#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node, schedulable again", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn uncordon_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.cordon(&name, false).await?))
}

/// Cordons a node and moves its shares to other nodes.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node, cordoned, its shares moved off (those that fit elsewhere)", body = NodeView),
        (status = 404, description = "no such node", body = ErrorBody),
    ))]
async fn drain_node(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.drain(&name).await?))
}
