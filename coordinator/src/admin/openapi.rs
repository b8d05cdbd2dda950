//! The parts of the OpenAPI document that are not one handler's: its header, the bearer scheme,
//! the error envelope, and the statuses every operation shares.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, PartialSchema, ToSchema};

use hexa_shared::tenant::NodeClass;

use super::ErrorBody;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Hexabase coordinator admin API",
        description = "Nodes, bootstrap tokens and tenants of a Hexabase node plane. Every request but \
            `/healthz` and `/v1/openapi.json` needs `Authorization: Bearer <token>` (the admin token is in \
            `<state-dir>/admin.token`). Errors are `{\"error\": {\"code\", \"message\"}}`: `code` says what \
            kind of failure it is, `message` what was wrong and what to do."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "nodes", description = "the node inventory"),
        (name = "tokens", description = "bootstrap tokens that admit nodes"),
        (name = "tenants", description = "tenants (one vCluster each) and their plans"),
        (name = "meta", description = "health, metrics and this document"),
    )
)]
pub(super) struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Responses several operations share, kept once under `components/responses`: (name, status,
/// description).
const SHARED: &[(&str, &str, &str)] = &[
    ("BadJson", "400", "the body is not JSON (`bad_request`)"),
    ("Unauthorized", "401", "missing or wrong bearer token (`unauthorized`)"),
    (
        "MethodNotAllowed",
        "405",
        "the path exists, but not with this method (`method_not_allowed`); `Allow` lists those it takes",
    ),
    ("PayloadTooLarge", "413", "the body is larger than 64 KiB (`payload_too_large`)"),
    (
        "UnsupportedMediaType",
        "415",
        "the body is not sent as `Content-Type: application/json` (`unsupported_media_type`)",
    ),
    (
        "InvalidBody",
        "422",
        "the body does not match the request schema: a missing or unknown field, or a wrong type (`invalid_body`)",
    ),
    ("Internal", "500", "the coordinator failed (`internal`); its log says why"),
    (
        "Unavailable",
        "503",
        "the state store cannot take the request now (`unavailable`): etcd has no quorum, or this coordinator no \
         longer leads; nothing was written, and the message says which",
    ),
];

/// Adds to every operation the statuses it shares with the others: 405 for its path; 401, 500 and
/// 503 behind the bearer token; 400, 413, 415 and 422 when it takes a JSON body. An operation's own
/// description of a status (a 400 that also covers a bad pool, say) is kept.
pub(super) fn common_responses(openapi: &mut OpenApi) {
    let components = openapi.components.get_or_insert_with(Default::default);
    for (name, status, description) in SHARED {
        let mut response = ResponseBuilder::new().description(*description).content(
            "application/json",
            ContentBuilder::new().schema(Some(RefOr::Ref(Ref::from_schema_name(ErrorBody::name())))).build(),
        );
        if *status == "405" {
            response = response.header(
                "Allow",
                HeaderBuilder::new().schema(String::schema()).description(Some("the methods this path takes")).build(),
            );
        }
        components.responses.insert((*name).to_string(), RefOr::T(response.build()));
    }
    let open = SecurityRequirement::default();
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            let authed = !operation.security.as_ref().is_some_and(|s| s.contains(&open));
            let with_body = operation.request_body.is_some();
            add(operation, "405", "MethodNotAllowed");
            if authed {
                add(operation, "401", "Unauthorized");
                add(operation, "500", "Internal");
                add(operation, "503", "Unavailable");
            }
            if with_body {
                add(operation, "400", "BadJson");
                add(operation, "413", "PayloadTooLarge");
                add(operation, "415", "UnsupportedMediaType");
                add(operation, "422", "InvalidBody");
            }
        }
    }
}

fn add(operation: &mut Operation, status: &str, shared: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(shared)));
}

/// Narrows the node class fields (a dedicated plan's, a token request's) from their pattern to the
/// classes `classes` names: the served document describes this coordinator's configuration, the
/// generated one any coordinator's.
pub(super) fn with_node_classes(document: &mut serde_json::Value, classes: &[NodeClass]) {
    let names: Vec<serde_json::Value> = classes.iter().map(|c| serde_json::Value::from(c.name.as_str())).collect();
    let schemas = &mut document["components"]["schemas"];
    if let Some(field) = schemas.pointer_mut("/TokenRequest/properties/node_class") {
        let mut values = names.clone();
        values.push(serde_json::Value::Null);
        field["enum"] = serde_json::Value::Array(values);
    }
    let variants = schemas.pointer_mut("/Plan/oneOf").and_then(serde_json::Value::as_array_mut);
    for variant in variants.into_iter().flatten() {
        if let Some(field) = variant.pointer_mut("/properties/node_class") {
            field["enum"] = serde_json::Value::Array(names.clone());
        }
    }
}
