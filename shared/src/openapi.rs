//! OpenAPI schemas (utoipa) for the shared types whose JSON form the derive cannot describe: the
//! internally tagged [`Plan`] and the [`Pool`] string. Everything else derives `ToSchema` next to
//! its serde derives, so a field added to a type shows up in the coordinator's document by itself.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::names::Pool;
use crate::tenant::{DedicatedPlan, Plan, SharedPlan};

/// Pattern of a tenant name: a DNS label of at most 40 characters (see [`crate::names`]).
pub const TENANT_NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$";
/// Pattern of a node name: a DNS label of at most 63 characters.
pub const NODE_NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Pattern of a pool: `server`, `shared` or `dedicated:<tenant>`.
pub const POOL_PATTERN: &str = "^(server|shared|dedicated:[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?)$";

/// `replicas` of a shared plan: 1, or 3 for a highly available control plane.
pub fn replicas_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Integer))
        .enum_values(Some([1, 3]))
        .description(Some("Control-plane replicas: 1, or 3 for a highly available control plane."))
        .build()
}

impl PartialSchema for Pool {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .pattern(Some(POOL_PATTERN))
            .description(Some("The pool a node joins: `server`, `shared` or `dedicated:<tenant>`."))
            .examples(["shared"])
            .into()
    }
}

impl ToSchema for Pool {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Pool")
    }
}

/// One variant of [`Plan`]: the variant struct's derived object with the `kind` tag added, as
/// serde writes it (`{"kind": "shared", "cpu_millis": ...}`). utoipa's own rendering of an
/// internally tagged enum is `allOf` of the struct and the tag, which no body can satisfy when the
/// struct denies unknown fields (the tag is one of them), so the tag goes into the object instead.
fn tagged(kind: &str, variant: RefOr<Schema>) -> Object {
    let kind_schema = ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)).enum_values(Some([kind]));
    let mut object = match variant {
        RefOr::T(Schema::Object(object)) => object,
        // A named struct always derives to an object (the coordinator's tests check that the plan
        // schemas list every field); were it not one, the tag alone is still described truthfully.
        _ => ObjectBuilder::new().schema_type(SchemaType::Type(Type::Object)).build(),
    };
    object.properties.insert("kind".to_string(), kind_schema.into());
    object.required.insert(0, "kind".to_string());
    object.title = Some(format!("{kind} plan"));
    object
}

impl PartialSchema for Plan {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(tagged("shared", SharedPlan::schema()))
            .item(tagged("dedicated", DedicatedPlan::schema()))
            .description(Some(
                "What a tenant buys: `kind` `shared` (a quota split into `spread` shares on distinct \
                 shared nodes) or `dedicated` (`count` whole nodes of one node class).",
            ))
            .into()
    }
}

impl ToSchema for Plan {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Plan")
    }
}
