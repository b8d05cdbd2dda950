//! `/v1/nodes`: the inventory, and cordon, uncordon and drain.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, Ctx, ErrorBody};
use crate::inventory::NodeView;

pub(super) fn routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
        .routes(routes!(cordon_node))
        .routes(routes!(uncordon_node))
        .routes(routes!(drain_node))
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
