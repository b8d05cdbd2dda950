//! The admin API's contract (auth, JSON errors, tokens) and `hexactl` driving it.

use std::process::Command;
use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_tests::admin::{Contract, Exchange};
use hexa_tests::inproc::Coordinator;
use hexa_tests::{bin, eventually};
use reqwest::Method;
use serde_json::{Value, json};

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, says: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should mention {says:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_authenticates_and_explains_its_errors() {
    let c = Coordinator::start().await;
    let base = c.admin.base.clone();
    let anonymous = c.admin.with_token("");
    let wrong = c.admin.with_token("not-the-token");

    // Health is open; everything else needs the bearer token.
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    for client in [&anonymous, &wrong] {
        for path in ["/v1/nodes", "/v1/tokens", "/metrics"] {
            let (status, body) = client.request(Method::GET, path, None).await;
            assert_error(status, &body, 401, "unauthorized", "");
        }
    }
    let (status, body) = anonymous.request(Method::GET, "/v1/nodes", None).await;
    assert_error(status, &body, 401, "unauthorized", "admin.token");
    // The scheme is case-insensitive (RFC 7235).
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let response = reqwest::Client::new()
            .get(format!("{base}/v1/nodes"))
            .header("Authorization", format!("{scheme} {}", c.admin.token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }

    let (status, body) = c.admin.request(Method::GET, "/v1/nodes/ghost", None).await;
    assert_error(status, &body, 404, "not_found", "ghost");
    let (status, body) = c.admin.request(Method::GET, "/v1/nope", None).await;
    assert_error(status, &body, 404, "not_found", "openapi");
    let (status, body) = c.admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "gpu"}))).await;
    assert_error(status, &body, 400, "bad_request", "server, shared or dedicated:<tenant>");
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "shared", "ttl": "soon"}))).await;
    assert_error(status, &body, 400, "bad_request", "30m or 1h");
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "shared", "tll": "1h"}))).await;
    assert_error(status, &body, 422, "invalid_body", "tll");
    let (status, body) = c.admin.request(Method::DELETE, "/v1/tokens/zzzzzz", None).await;
    assert_error(status, &body, 404, "not_found", "zzzzzz");

    // A used token cannot be revoked; an unused one can, once, and listings never show secrets.
    let agent = c.spawn_agent("api-node").await;
    eventually(Duration::from_secs(20), "node Ready", async || {
        c.admin.node("api-node").await.filter(|n| n.health == Health::Ready)
    })
    .await;
    let (_, tokens) = c.admin.request(Method::GET, "/v1/tokens", None).await;
    let used = tokens.as_array().unwrap().iter().find(|t| t["used_by"] == "api-node").unwrap().clone();
    let (status, body) =
        c.admin.request(Method::DELETE, &format!("/v1/tokens/{}", used["id"].as_str().unwrap()), None).await;
    assert_error(status, &body, 409, "conflict", "already used by node api-node");
    assert!(!tokens.to_string().contains("secret"));

    let (status, openapi) = anonymous.request(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    for path in ["/v1/nodes", "/v1/nodes/{name}", "/v1/tokens", "/v1/tokens/{id}", "/metrics", "/healthz"] {
        assert!(openapi["paths"][path].is_object(), "{path} undocumented");
    }
    let metrics = c.admin.metrics().await;
    assert!(metrics.contains("hexa_nodes{health=\"ready\"} 1"), "{metrics}");
    assert!(hexa_tests::admin::metric(&metrics, "hexa_reports_total") >= 1);
    assert_answers_match_the_document(&Contract::new(openapi), &c.admin.exchanges());
    agent.stop().await;
}

/// Every answer is one the document describes: its operation, status, media type and body schema.
fn assert_answers_match_the_document(contract: &Contract, exchanges: &[Exchange]) {
    let failures: Vec<String> = exchanges.iter().filter_map(|e| contract.check(e).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} answers break the document:\n{}",
        failures.len(),
        exchanges.len(),
        failures.join("\n")
    );
}

fn shared_plan(cpu_millis: u64) -> Value {
    json!({"kind": "shared", "cpu_millis": cpu_millis, "memory_bytes": 256u64 << 20, "pods": 5, "replicas": 1, "spread": 1})
}

/// Each operation once with success and once with each error it documents, every answer checked
/// against the document the server serves. A new endpoint fails here until it is exercised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_openapi_document() {
    let c = Coordinator::start().await;
    let admin = &c.admin;
    let anonymous = admin.with_token("");
    let wrong = admin.with_token("not-the-token");
    let agent = c.spawn_agent("contract-node").await;
    eventually(Duration::from_secs(20), "node Ready with a report", async || {
        admin.node("contract-node").await.filter(|n| n.health == Health::Ready && n.allocatable.is_some())
    })
    .await;
    let (status, document) = anonymous.request(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    let contract = Contract::new(document);

    // Successes.
    let (status, body) = anonymous.request(Method::GET, "/healthz", None).await;
    assert_eq!((status, body), (200, json!("ok\n")));
    admin.metrics().await;
    for (method, path) in [
        (Method::GET, "/v1/nodes"),
        (Method::GET, "/v1/nodes/contract-node"),
        (Method::POST, "/v1/nodes/contract-node/cordon"),
        (Method::POST, "/v1/nodes/contract-node/uncordon"),
        (Method::POST, "/v1/nodes/contract-node/drain"),
        (Method::POST, "/v1/nodes/contract-node/uncordon"),
        (Method::GET, "/v1/tokens"),
        (Method::GET, "/v1/provisioning"),
    ] {
        let (status, body) = admin.request(method.clone(), path, None).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    let (status, token) = admin
        .request(Method::POST, "/v1/tokens", Some(json!({"pool": "shared", "ttl": "1h 30m", "description": "rack 4"})))
        .await;
    assert_eq!(status, 201, "{token}");
    let (status, body) =
        admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "dedicated:acme", "node_class": "S"}))).await;
    assert_eq!((status, body["node_class"].as_str()), (201, Some("S")), "{body}");
    let id = token["id"].as_str().unwrap();
    let (status, body) = admin.request(Method::DELETE, &format!("/v1/tokens/{id}"), None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("revoked")), "{body}");
    let (status, body) =
        admin.request(Method::POST, "/v1/nodes/contract-node/reenroll", Some(json!({"ttl": "10m"}))).await;
    assert_eq!((status, body["pool"].as_str()), (201, Some("shared")), "{body}");
    let tenant = json!({"name": "contract", "plan": shared_plan(200)});
    let (status, body) = admin.request(Method::POST, "/v1/tenants", Some(tenant.clone())).await;
    assert_eq!(status, 201, "{body}");
    for path in ["/v1/tenants", "/v1/tenants/contract"] {
        let (status, body) = admin.request(Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let dedicated = json!({"plan": {"kind": "dedicated", "node_class": "S", "count": 1}});
    let (status, body) = admin.request(Method::PATCH, "/v1/tenants/contract", Some(dedicated)).await;
    assert_eq!((status, body["phase"].as_str()), (200, Some("Provisioning")), "{body}");
    let (status, body) = admin.request(Method::GET, "/v1/provisioning", None).await;
    assert_eq!((status, body[0]["tenant"].as_str()), (200, Some("contract")), "{body}");
    let (status, body) =
        admin.request(Method::PATCH, "/v1/tenants/contract", Some(json!({"plan": shared_plan(200)}))).await;
    assert_eq!(status, 200, "{body}");

    // Conflicts and refusals of the content.
    let (status, body) = admin.request(Method::POST, "/v1/tenants", Some(tenant)).await;
    assert_error(status, &body, 409, "conflict", "already exists");
    let (status, body) = admin
        .request(Method::POST, "/v1/tenants", Some(json!({"name": "greedy", "plan": shared_plan(100_000_000)})))
        .await;
    assert_error(status, &body, 422, "unplaceable", "shrink the quota");
    let (status, body) =
        admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "Bad_Name", "plan": shared_plan(200)}))).await;
    assert_error(status, &body, 422, "invalid_name", "Bad_Name");
    let mut three = shared_plan(200);
    three["replicas"] = json!(2);
    let (status, body) = admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "two", "plan": three}))).await;
    assert_error(status, &body, 422, "invalid_plan", "replicas 2");
    let (status, body) = admin.request(Method::PATCH, "/v1/tenants/contract", Some(json!({"plan": three}))).await;
    assert_error(status, &body, 422, "invalid_plan", "replicas 2");
    let (status, body) =
        admin.request(Method::PATCH, "/v1/tenants/contract", Some(json!({"plan": shared_plan(100_000_000)}))).await;
    assert!(status == 409 || status == 422, "{body}");
    let (status, body) = admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "dedicated:Bad_Name"}))).await;
    assert_error(status, &body, 400, "invalid_name", "Bad_Name");
    let (status, body) =
        admin.request(Method::POST, "/v1/tokens", Some(json!({"pool": "shared", "node_class": "S"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (_, tokens) = admin.request(Method::GET, "/v1/tokens", None).await;
    let used = tokens.as_array().unwrap().iter().find(|t| t["used_by"] == "contract-node").unwrap()["id"].clone();
    let (status, body) = admin.request(Method::DELETE, &format!("/v1/tokens/{}", used.as_str().unwrap()), None).await;
    assert_error(status, &body, 409, "conflict", "already used");

    // Not found, for every operation on a named thing.
    for (method, path) in [
        (Method::GET, "/v1/nodes/ghost"),
        (Method::POST, "/v1/nodes/ghost/cordon"),
        (Method::POST, "/v1/nodes/ghost/uncordon"),
        (Method::POST, "/v1/nodes/ghost/drain"),
        (Method::POST, "/v1/nodes/ghost/revoke"),
        (Method::DELETE, "/v1/nodes/ghost"),
        (Method::DELETE, "/v1/tokens/zzzzzz"),
        (Method::GET, "/v1/tenants/ghost"),
        (Method::DELETE, "/v1/tenants/ghost"),
        (Method::GET, "/v1/nowhere"),
    ] {
        let (status, body) = admin.request(method.clone(), path, None).await;
        assert_error(status, &body, 404, "not_found", "");
    }
    let (status, body) =
        admin.request(Method::PATCH, "/v1/tenants/ghost", Some(json!({"plan": shared_plan(200)}))).await;
    assert_error(status, &body, 404, "not_found", "ghost");
    let (status, body) = admin.request(Method::POST, "/v1/nodes/ghost/reenroll", Some(json!({}))).await;
    assert_error(status, &body, 404, "not_found", "ghost");

    // Bodies that cannot be read, for every operation that takes one.
    let rust_words = ["struct ", "enum ", "u64", "u32", "u8", "Request", "Plan"];
    for (method, path, good) in [
        (Method::POST, "/v1/tokens", json!({"pool": "shared"})),
        (Method::POST, "/v1/tenants", json!({"name": "bodies", "plan": shared_plan(200)})),
        (Method::PATCH, "/v1/tenants/contract", json!({"plan": shared_plan(200)})),
        (Method::POST, "/v1/nodes/contract-node/reenroll", json!({"ttl": "1h"})),
    ] {
        let (status, body) = admin.request_bytes(method.clone(), path, "application/json", b"{plan: 1}".to_vec()).await;
        assert_error(status, &body, 400, "bad_request", "not valid JSON");
        let (status, body) =
            admin.request_bytes(method.clone(), path, "text/plain", good.to_string().into_bytes()).await;
        assert_error(status, &body, 415, "unsupported_media_type", "application/json");
        let mut big = good.clone();
        big["padding"] = json!("x".repeat(70 * 1024));
        let (status, body) =
            admin.request_bytes(method.clone(), path, "application/json", big.to_string().into_bytes()).await;
        assert_error(status, &body, 413, "payload_too_large", "65536 bytes");
        for bad in [json!({"unexpected": 1}), json!([1]), json!("plan")] {
            let (status, body) = admin.request(method.clone(), path, Some(bad)).await;
            assert_error(status, &body, 422, "invalid_body", "");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(!rust_words.iter().any(|w| message.contains(w)), "{message:?} speaks Rust");
        }
    }
    let mut wrong_type = shared_plan(200);
    wrong_type["cpu_millis"] = json!("lots");
    for (method, path, body) in [
        (Method::POST, "/v1/tenants", json!({"name": "typed", "plan": wrong_type.clone()})),
        (Method::PATCH, "/v1/tenants/contract", json!({"plan": wrong_type})),
        (Method::POST, "/v1/tokens", json!({"pool": 7})),
    ] {
        let (status, body) = admin.request(method, path, Some(body)).await;
        assert_error(status, &body, 422, "invalid_body", "");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(!rust_words.iter().any(|w| message.contains(w)), "{message:?} speaks Rust");
    }
    let long = "n".repeat(10_000);
    let (status, body) = admin.request(Method::GET, &format!("/v1/tenants/{long}"), None).await;
    assert_error(status, &body, 404, "not_found", "");
    assert!(body["error"]["message"].as_str().unwrap().len() <= 1024, "{body}");

    // Revoking keeps the node listed, its certificate dead; deleting forgets it.
    let (status, body) = admin.request(Method::POST, "/v1/nodes/contract-node/revoke", None).await;
    assert!(status == 200 && body["revoked_at_unix"].is_i64(), "{status} {body}");
    let (status, body) = admin.request(Method::DELETE, "/v1/nodes/contract-node", None).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("contract-node")), "{body}");

    // Every documented operation: without the token (where one is needed), and with a method its
    // path does not take.
    for (template, method) in contract.operations() {
        let path = template.replace("{name}", "contract-node").replace("{id}", "zzzzzz");
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        if !matches!(template.as_str(), "/healthz" | "/v1/openapi.json") {
            for client in [&anonymous, &wrong] {
                let (status, body) = client.request(method.clone(), &path, None).await;
                assert_error(status, &body, 401, "unauthorized", "");
            }
        }
        let (status, body) = admin.request(Method::PUT, &path, None).await;
        assert_error(status, &body, 405, "method_not_allowed", "Allow");
    }
    let response = reqwest::Client::new().put(format!("{}/v1/tenants/contract", admin.base)).send().await.unwrap();
    let allow = response.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(allow.contains("GET") && allow.contains("PATCH") && allow.contains("DELETE"), "{allow:?}");

    let (status, body) = admin.request(Method::DELETE, "/v1/tenants/contract", None).await;
    assert_eq!(status, 200, "{body}");

    // Every answer is documented; every operation was seen to succeed.
    let exchanges = admin.exchanges();
    assert_answers_match_the_document(&contract, &exchanges);
    for (template, method) in contract.operations() {
        let succeeded = exchanges.iter().any(|e| {
            e.method.as_str().eq_ignore_ascii_case(&method)
                && (200..300).contains(&e.status)
                && contract.operation(e.method.as_str(), &e.path).is_some_and(|(t, _)| t == template)
        });
        assert!(succeeded, "{method} {template} was never exercised with success: add it to this test");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hexactl_manages_tokens_and_lists_nodes() {
    let c = Coordinator::start().await;
    let hexactl = |args: &[&str]| {
        let out = Command::new(bin("hexactl"))
            .args(args)
            .env("HEXA_SERVER", &c.admin.base)
            .env("HEXA_TOKEN", &c.admin.token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // token create prints the token alone, ready for a script, and says the rest on stderr.
    let (ok, token, note) =
        hexactl(&["token", "create", "--pool", "shared", "--ttl", "30m", "--description", "rack 4"]);
    assert!(ok, "{note}");
    let token = token.trim().to_string();
    assert!(hexa_coordinator::bootstrap::parse_token(&token).is_some(), "{token:?}");
    assert!(note.contains("shown only now"), "{note}");
    let id = token.split('.').next().unwrap();

    let (ok, table, _) = hexactl(&["token", "list"]);
    assert!(ok);
    assert!(table.starts_with("ID "), "{table}");
    let row = table.lines().find(|l| l.starts_with(id)).unwrap();
    assert!(row.contains("shared") && row.contains("active") && row.contains("rack 4"), "{row}");
    assert!(!table.contains(&token), "the secret is never listed");

    let (ok, out, _) = hexactl(&["token", "revoke", id]);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, json_out, _) = hexactl(&["-o", "json", "token", "list"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(listed[0]["status"], "revoked");
    let (ok, table, _) = hexactl(&["token", "list", "--active"]);
    assert!(ok && !table.contains(id), "revoked tokens are hidden: {table}");
    let (ok, _, err) = hexactl(&["token", "revoke", "zzzzzz"]);
    assert!(!ok && err.contains("no bootstrap token with id \"zzzzzz\"") && err.contains("404"), "{err}");

    let agent = c.spawn_agent("ctl-node").await;
    eventually(Duration::from_secs(20), "node Ready", async || {
        c.admin.node("ctl-node").await.filter(|n| n.health == Health::Ready && n.capacity.is_some())
    })
    .await;
    let (ok, table, _) = hexactl(&["nodes"]);
    assert!(ok);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    let row = table.lines().find(|l| l.starts_with("ctl-node")).unwrap();
    assert!(row.contains("Ready") && row.contains("GiB free of"), "{row}");
    let (ok, json_out, _) = hexactl(&["nodes", "-o", "json"]);
    assert!(ok);
    let nodes: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(nodes[0]["name"], "ctl-node");
    assert!(nodes[0]["capacity"]["cpu_millis"].as_u64().unwrap() > 0);

    // Tenants and nodes through the CLI.
    let (ok, table, err) = hexactl(&["tenant", "create", "cli-t", "--cpu", "500m", "--memory", "1Gi", "--pods", "10"]);
    assert!(ok, "{err}");
    let row = table.lines().find(|l| l.starts_with("cli-t")).unwrap();
    assert!(row.contains("shared") && row.contains("Deploying") && row.contains("ctl-node"), "{row}");
    let (ok, json_out, _) = hexactl(&["-o", "json", "tenant", "get", "cli-t"]);
    let one: Value = serde_json::from_str(&json_out).unwrap();
    assert!(ok && one["name"] == "cli-t", "one tenant is an object: {json_out}");
    // Flags left out keep what the tenant has; a flag of the other plan is refused.
    let (ok, _, err) = hexactl(&["tenant", "set-plan", "cli-t", "--pods", "12"]);
    assert!(ok, "{err}");
    let tenant = c.admin.request(reqwest::Method::GET, "/v1/tenants/cli-t", None).await.1;
    assert_eq!((tenant["plan"]["pods"].as_u64(), tenant["plan"]["cpu_millis"].as_u64()), (Some(12), Some(500)));
    let (ok, _, err) = hexactl(&["tenant", "set-plan", "cli-t", "--class", "S"]);
    assert!(!ok && err.contains("dedicated plan only"), "{err}");
    let (ok, _, err) = hexactl(&["tenant", "create", "cli-u"]);
    assert!(!ok && err.contains("needs --cpu"), "{err}");
    let (ok, _, err) = hexactl(&["tenant", "create", "cli-u", "--cpu", "lots", "--memory", "1Gi"]);
    assert!(!ok && err.contains("millicores"), "{err}");
    let (ok, table, _) = hexactl(&["tenant", "set-plan", "cli-t", "--plan", "dedicated", "--class", "S"]);
    assert!(ok);
    assert!(table.contains("Provisioning") && table.contains("1 x S"), "{table}");
    let (ok, table, _) = hexactl(&["provisioning"]);
    assert!(ok && table.lines().any(|l| l.starts_with("cli-t") && l.contains(" S ")), "{table}");
    let (ok, json_out, _) = hexactl(&["-o", "json", "tenant", "list"]);
    assert!(ok);
    let tenants: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(tenants[0]["plan"]["kind"], "dedicated");
    let (ok, _, _) = hexactl(&["--yes", "tenant", "delete", "cli-t"]);
    assert!(ok);
    let (ok, _, err) = hexactl(&["tenant", "get", "cli-t"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, table, _) = hexactl(&["node", "cordon", "ctl-node"]);
    assert!(ok && table.contains("ctl-node") && table.contains("Ready,cordoned"), "{table}");
    let (ok, _, err) = hexactl(&["tenant", "create", "cli-v", "--cpu", "1", "--memory", "1Gi"]);
    assert!(!ok && err.contains("409"), "cordoned: {err}");
    let (ok, _, _) = hexactl(&["node", "uncordon", "ctl-node"]);
    assert!(ok);
    let (ok, _, err) = hexactl(&["--yes", "node", "drain", "ghost"]);
    assert!(!ok && err.contains("no node named \"ghost\""), "{err}");

    // A coordinator that is not there is named, with what to do.
    let out = Command::new(bin("hexactl"))
        .args(["--server", "http://127.0.0.1:9", "nodes"])
        .env("HEXA_TOKEN", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot reach the coordinator at http://127.0.0.1:9"), "{err}");
    agent.stop().await;
}

/// The contract check itself: it refuses a field, a status or a body the document does not have.
#[test]
fn the_contract_refuses_what_the_document_does_not_say() {
    let contract = Contract::new(hexa_coordinator::admin::openapi_document());
    let exchange = |method: Method, path: &str, status: u16, content_type: &str, body: Value| Exchange {
        method,
        path: path.to_string(),
        status,
        content_type: Some(content_type.to_string()),
        body,
    };
    let token = json!({"id": "abc123", "pool": "shared", "description": "", "node_class": null,
        "created_at_unix": 1, "expires_at_unix": 2, "status": "revoked", "used_by": null});
    let error = json!({"error": {"code": "method_not_allowed", "message": "no"}});
    let json = "application/json";
    let good = [
        exchange(Method::DELETE, "/v1/tokens/abc123", 200, json, token.clone()),
        exchange(Method::GET, "/v1/tokens", 200, json, json!([token])),
        exchange(Method::PUT, "/v1/nodes", 405, json, error.clone()),
        exchange(Method::GET, "/v1/nowhere", 404, json, json!({"error": {"code": "not_found", "message": "no"}})),
        exchange(Method::GET, "/healthz", 200, "text/plain; charset=utf-8", json!("ok\n")),
    ];
    for e in &good {
        assert_eq!(contract.check(e), Ok(()), "{e:?}");
    }
    let mut extra_field = token.clone();
    extra_field["secret"] = json!("x");
    let mut missing_field = token.clone();
    missing_field.as_object_mut().unwrap().remove("pool");
    let mut bad_status = token.clone();
    bad_status["status"] = json!("lost");
    let bad = [
        exchange(Method::DELETE, "/v1/tokens/abc123", 200, json, extra_field.clone()),
        exchange(Method::GET, "/v1/tokens", 200, json, json!([extra_field])),
        exchange(Method::DELETE, "/v1/tokens/abc123", 200, json, missing_field),
        exchange(Method::DELETE, "/v1/tokens/abc123", 200, json, bad_status),
        exchange(Method::GET, "/v1/nodes", 409, json, error.clone()),
        exchange(Method::PUT, "/v1/nodes", 405, json, json!("")),
        exchange(Method::PUT, "/v1/nodes", 404, json, error.clone()),
        exchange(Method::GET, "/v1/nowhere", 500, json, error.clone()),
        exchange(Method::GET, "/v1/nodes/x", 404, json, json!({"error": {"code": "gone", "message": "no"}})),
        exchange(Method::DELETE, "/v1/tokens/abc123", 200, "text/plain", token.clone()),
        exchange(Method::GET, "/healthz", 200, json, json!({"ok": true})),
    ];
    for e in &bad {
        assert!(contract.check(e).is_err(), "accepted {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hexactl_asks_before_destroying_and_waits_with_progress() {
    let c = Coordinator::start().await;
    let agent = c.spawn_agent("ask-node").await;
    hexa_tests::eventually(std::time::Duration::from_secs(30), "node Ready", async || {
        c.admin.node("ask-node").await.filter(|n| n.allocatable.is_some())
    })
    .await;
    let hexactl = |args: &[&str]| {
        // Standard input is not a terminal here: nothing destructive may happen unasked.
        let out = Command::new(bin("hexactl"))
            .args(args)
            .env("HEXA_SERVER", &c.admin.base)
            .env("HEXA_TOKEN", &c.admin.token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = hexactl(&["tenant", "create", "acme", "--cpu", "100m", "--memory", "128Mi", "--pods", "5"]);
    assert!(ok, "{err}");

    for args in [&["tenant", "delete", "acme"][..], &["node", "drain", "ask-node"], &["node", "delete", "ask-node"]] {
        let (ok, _, err) = hexactl(args);
        assert!(!ok && err.contains("not confirmed") && err.contains("--yes"), "{args:?}: {err}");
    }
    assert_eq!(c.admin.request(Method::GET, "/v1/tenants/acme", None).await.0, 200, "the tenant is still there");
    assert!(!c.admin.node("ask-node").await.unwrap().cordoned, "the node was not drained");

    // A drain that cannot move the only node's share says so, and why.
    let (ok, _, err) = hexactl(&["--yes", "node", "drain", "ask-node"]);
    assert!(ok, "{err}");
    assert!(err.contains("node ask-node: 0 moved off"), "{err}");
    assert!(err.contains("could not move: acme: Degraded"), "{err}");
    let (ok, _, _) = hexactl(&["node", "uncordon", "ask-node"]);
    assert!(ok);

    // Without a host cluster a tenant is never Ready: --wait shows where it stands and gives up.
    let (ok, _, err) =
        hexactl(&["--wait", "--timeout", "2s", "tenant", "create", "beta", "--cpu", "100m", "--memory", "128Mi"]);
    assert!(!ok, "{err}");
    eprintln!("{err}");
    assert!(err.lines().next().is_some_and(|l| l.starts_with("beta: ")), "progress comes first: {err}");
    assert!(err.contains("gave up waiting after 2s"), "{err}");

    // A confirmed delete with --wait follows the tenant until it is gone.
    let (ok, _, err) = hexactl(&["--yes", "--wait", "tenant", "delete", "acme"]);
    assert!(ok, "{err}");
    assert!(err.contains("acme: gone"), "{err}");
    assert_eq!(c.admin.request(Method::GET, "/v1/tenants/acme", None).await.0, 404);
    // A node's provider identity has a shape a script can read, not a debug string.
    let (_, node) = c.admin.request(Method::GET, "/v1/nodes/ask-node", None).await;
    assert_eq!(node["provider"], json!({"kind": "none"}), "{node}");
    agent.stop().await;
}
