//! The generated document says what the server does (the end-to-end contract test in
//! `tests/tests/admin_api.rs` checks real answers against it).

use serde_json::{Value, json};

use hexa_shared::names::MAX_TENANT_NAME;
use hexa_shared::tenant::{MAX_DEDICATED_NODES, MAX_SPREAD, MIN_SHARE_CPU_MILLIS, MIN_SHARE_MEMORY_BYTES};

use super::openapi_document;

fn schema<'a>(document: &'a Value, name: &str) -> &'a Value {
    let schema = &document["components"]["schemas"][name];
    assert!(schema.is_object(), "no schema {name}");
    schema
}

fn plan_variant<'a>(document: &'a Value, kind: &str) -> &'a Value {
    schema(document, "Plan")["oneOf"]
        .as_array()
        .and_then(|variants| variants.iter().find(|v| v["properties"]["kind"]["enum"] == json!([kind])))
        .unwrap_or_else(|| panic!("no {kind} plan in {}", schema(document, "Plan")))
}

#[test]
fn every_route_is_documented_with_its_methods() {
    let document = openapi_document();
    assert_eq!(document["openapi"], "3.1.0");
    let expected = [
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/v1/openapi.json", "get"),
        ("/v1/nodes", "get"),
        ("/v1/nodes/{name}", "get"),
        ("/v1/nodes/{name}", "delete"),
        ("/v1/nodes/{name}/revoke", "post"),
        ("/v1/nodes/{name}/reenroll", "post"),
        ("/v1/nodes/{name}/cordon", "post"),
        ("/v1/nodes/{name}/uncordon", "post"),
        ("/v1/nodes/{name}/drain", "post"),
        ("/v1/tokens", "get"),
        ("/v1/tokens", "post"),
        ("/v1/tokens/{id}", "delete"),
        ("/v1/tenants", "get"),
        ("/v1/tenants", "post"),
        ("/v1/tenants/{name}", "get"),
        ("/v1/tenants/{name}", "patch"),
        ("/v1/tenants/{name}", "delete"),
        ("/v1/provisioning", "get"),
    ];
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            documented.push((path.clone(), method.clone()));
        }
    }
    documented.sort();
    let mut expected: Vec<(String, String)> = expected.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    expected.sort();
    assert_eq!(documented, expected);
}

#[test]
fn every_operation_documents_its_errors_with_the_envelope() {
    let document = openapi_document();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let responses = &operation["responses"];
            let open = path == "/healthz" || path == "/v1/openapi.json";
            let mut statuses = vec!["405"];
            if !open {
                statuses.extend(["401", "500"]);
            }
            if operation.get("requestBody").is_some() {
                statuses.extend(["400", "413", "415", "422"]);
            }
            if path.contains('{') {
                statuses.push("404");
            }
            for status in statuses {
                assert!(responses[status].is_object(), "{method} {path} lacks {status}: {responses}");
            }
            assert_eq!(operation.get("security").is_some(), open, "{method} {path}");
        }
    }
    let error = schema(&document, "Error");
    assert_eq!(error["required"], json!(["error"]));
    let detail = schema(&document, "ErrorDetail");
    assert_eq!(detail["required"], json!(["code", "message"]));
    let codes = &schema(&document, "ErrorCode")["enum"];
    for code in ["bad_request", "payload_too_large", "unsupported_media_type", "invalid_body", "invalid_name"] {
        assert!(codes.as_array().is_some_and(|c| c.contains(&json!(code))), "{code} not in {codes}");
    }
    let allow = &document["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"];
    assert!(allow.is_object(), "405 documents its Allow header");
}

#[test]
fn requests_are_described_as_the_server_reads_them() {
    let document = openapi_document();
    let token = schema(&document, "TokenRequest");
    assert_eq!(token["additionalProperties"], false);
    assert_eq!(token["required"], json!(["pool"]));
    for field in ["pool", "ttl", "description", "node_class"] {
        assert!(token["properties"][field].is_object(), "TokenRequest.{field}");
    }
    assert!(token["properties"]["ttl"]["pattern"].is_string());
    assert!(schema(&document, "Pool")["pattern"].is_string());

    let tenant = schema(&document, "TenantRequest");
    assert_eq!(tenant["additionalProperties"], false);
    assert_eq!(tenant["properties"]["name"]["maxLength"], MAX_TENANT_NAME);
    assert!(tenant["properties"]["name"]["pattern"].is_string());

    // Plans are one of two complete objects, tag included, with the bounds validation enforces.
    let shared = plan_variant(&document, "shared");
    assert_eq!(shared["additionalProperties"], false);
    assert_eq!(shared["required"], json!(["kind", "cpu_millis", "memory_bytes", "pods", "replicas", "spread"]));
    assert_eq!(shared["properties"]["cpu_millis"]["minimum"], MIN_SHARE_CPU_MILLIS);
    assert_eq!(shared["properties"]["memory_bytes"]["minimum"], MIN_SHARE_MEMORY_BYTES);
    assert_eq!(shared["properties"]["pods"]["minimum"], 1);
    assert_eq!(shared["properties"]["replicas"]["enum"], json!([1, 3]));
    assert_eq!(shared["properties"]["spread"]["minimum"], 1);
    assert_eq!(shared["properties"]["spread"]["maximum"], MAX_SPREAD);
    let dedicated = plan_variant(&document, "dedicated");
    assert_eq!(dedicated["additionalProperties"], false);
    assert_eq!(dedicated["required"], json!(["kind", "node_class", "count"]));
    assert_eq!(dedicated["properties"]["count"]["minimum"], 1);
    assert_eq!(dedicated["properties"]["count"]["maximum"], MAX_DEDICATED_NODES);
}

#[test]
fn plans_in_the_document_accept_what_serde_accepts_and_refuse_what_it_refuses() {
    use hexa_shared::tenant::Plan;
    let document = openapi_document();
    let mut plan = schema(&document, "Plan").clone();
    if let Some(map) = plan.as_object_mut() {
        map.insert("$defs".into(), document["components"]["schemas"].clone());
    }
    let plan: Value = serde_json::from_str(&plan.to_string().replace("#/components/schemas/", "#/$defs/"))
        .unwrap_or_else(|e| panic!("{e}"));
    let validator = jsonschema::draft202012::new(&plan).unwrap_or_else(|e| panic!("{e}"));
    let cases = [
        json!({"kind": "shared", "cpu_millis": 1000, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1}),
        json!({"kind": "dedicated", "node_class": "M", "count": 2}),
        json!({"kind": "dedicated", "node_class": "M", "count": 2, "spread": 1}),
        json!({"kind": "shared", "cpu_millis": 1000}),
        json!({"kind": "big", "node_class": "M", "count": 2}),
        json!({"node_class": "M", "count": 2}),
    ];
    for case in cases {
        let serde_ok = serde_json::from_value::<Plan>(case.clone()).is_ok();
        assert_eq!(validator.is_valid(&case), serde_ok, "{case}");
    }
}

#[test]
fn the_served_document_names_the_configured_node_classes() {
    let mut document = openapi_document();
    super::openapi::with_node_classes(&mut document, &hexa_shared::tenant::NodeClass::defaults());
    assert_eq!(plan_variant(&document, "dedicated")["properties"]["node_class"]["enum"], json!(["S", "M", "L"]));
    assert_eq!(schema(&document, "TokenRequest")["properties"]["node_class"]["enum"], json!(["S", "M", "L", null]));
    assert!(plan_variant(&openapi_document(), "dedicated")["properties"]["node_class"].get("enum").is_none());
}

#[test]
fn name_patterns_agree_with_the_naming_rules() {
    use hexa_shared::names::{validate_node_name, validate_tenant_name};
    use hexa_shared::openapi::{NODE_NAME_PATTERN, POOL_PATTERN, TENANT_NAME_PATTERN};
    let document = openapi_document();
    assert_eq!(schema(&document, "TenantRequest")["properties"]["name"]["pattern"], TENANT_NAME_PATTERN);
    assert_eq!(schema(&document, "Tenant")["properties"]["name"]["pattern"], TENANT_NAME_PATTERN);
    assert_eq!(schema(&document, "NodeView")["properties"]["name"]["pattern"], NODE_NAME_PATTERN);
    assert_eq!(schema(&document, "Pool")["pattern"], POOL_PATTERN);
    let matcher = |pattern: &str| {
        jsonschema::draft202012::new(&json!({"type": "string", "pattern": pattern})).unwrap_or_else(|e| panic!("{e}"))
    };
    let (tenant, node, pool) = (matcher(TENANT_NAME_PATTERN), matcher(NODE_NAME_PATTERN), matcher(POOL_PATTERN));
    let names = [
        "a",
        "acme",
        "a-b",
        "0",
        "-a",
        "a-",
        "A",
        "a_b",
        "",
        "é",
        &"a".repeat(40),
        &"a".repeat(41),
        &"a".repeat(63),
        &"a".repeat(64),
    ];
    for name in names {
        let value = json!(name);
        assert_eq!(tenant.is_valid(&value), validate_tenant_name(name).is_ok(), "tenant {name:?}");
        assert_eq!(node.is_valid(&value), validate_node_name(name).is_ok(), "node {name:?}");
        let dedicated = format!("dedicated:{name}");
        assert_eq!(
            pool.is_valid(&json!(dedicated)),
            dedicated.parse::<hexa_shared::names::Pool>().is_ok(),
            "{dedicated}"
        );
    }
    for other in ["server", "shared", "dedicated", "gpu", "Shared"] {
        assert_eq!(pool.is_valid(&json!(other)), other.parse::<hexa_shared::names::Pool>().is_ok(), "{other}");
    }
}
