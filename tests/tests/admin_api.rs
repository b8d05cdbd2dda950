//! The admin API's contract (auth, JSON errors, tokens) and `hexactl` driving it.

use std::process::Command;
use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_tests::admin::AdminClient;
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
    let anonymous = AdminClient::new(base.clone(), String::new());
    let wrong = AdminClient::new(base.clone(), "not-the-token".into());

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
    let (ok, _, _) = hexactl(&["tenant", "delete", "cli-t"]);
    assert!(ok);
    let (ok, _, err) = hexactl(&["tenant", "get", "cli-t"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, table, _) = hexactl(&["node", "cordon", "ctl-node"]);
    assert!(ok && table.contains("ctl-node"), "{table}");
    let (ok, _, err) = hexactl(&["tenant", "create", "cli-v", "--cpu", "1", "--memory", "1Gi"]);
    assert!(!ok && err.contains("409"), "cordoned: {err}");
    let (ok, _, _) = hexactl(&["node", "uncordon", "ctl-node"]);
    assert!(ok);
    let (ok, _, err) = hexactl(&["node", "drain", "ghost"]);
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
