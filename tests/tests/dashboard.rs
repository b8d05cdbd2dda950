//! The Grafana dashboard shipped in `packaging/grafana/` graphs only what the coordinator exports:
//! every panel's queries are read from the dashboard, the metric names are taken out of each
//! PromQL expression, and each must be in a real coordinator's `/metrics` after a node has
//! reported, linked again, enforced isolation and a tenant was placed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hexa_coordinator::store::Health;
use hexa_tests::admin::metric;
use hexa_tests::eventually;
use hexa_tests::inproc::{Agent, Coordinator};
use hexa_tests::raw;
use reqwest::Method;
use serde_json::{Value, json};

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/hexa-node-plane.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included (a collapsed row keeps its panels inside it).
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// PromQL's functions, aggregations, operators and modifiers: words in an expression that are not
/// metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
];

/// The words of a PromQL expression without grouping clauses (see [`queried_metrics`]) that are
/// metric names: what is left once strings, label matchers (`{...}`), ranges (`[...]`), numbers,
/// `$variables`, function calls and PromQL's own words are taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut text = String::new();
    let mut chars = expr.chars().peekable();
    // Strings, matchers and ranges go; each becomes a space.
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for next in chars.by_ref() {
                    if !escaped && next == c {
                        break;
                    }
                    escaped = !escaped && next == '\\';
                }
                text.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                // Label values are strings, which may hold the closing bracket.
                let (mut quote, mut escaped) = (None, false);
                for next in chars.by_ref() {
                    match quote {
                        Some(q) if !escaped && next == q => quote = None,
                        Some(_) => escaped = !escaped && next == '\\',
                        None if next == '"' || next == '\'' || next == '`' => quote = Some(next),
                        None if next == close => break,
                        None => {}
                    }
                }
                text.push(' ');
            }
            c => text.push(c),
        }
    }
    // Tokens: identifiers (with whether a `(` follows) and everything else.
    let mut tokens: Vec<(String, bool)> = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':') {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let mut j = i;
            while j < bytes.len() && bytes[j].is_whitespace() {
                j += 1;
            }
            tokens.push((word, bytes.get(j) == Some(&'(')));
        } else {
            // A number's digits and exponent, or a `$variable`, are skipped whole.
            if c.is_ascii_digit() || c == '$' {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == '.') {
                    i += 1;
                }
                continue;
            }
            i += 1;
        }
    }
    tokens
        .into_iter()
        .filter(|(word, call)| !call && !PROMQL_WORDS.contains(&word.to_ascii_lowercase().as_str()))
        .map(|(word, _)| word)
        .collect()
}

/// The metric names a PromQL expression reads: grouping clauses (`by (le, plan)`, whose labels
/// look like names) are taken out, then [`metric_names`].
fn queried_metrics(expr: &str) -> BTreeSet<String> {
    let mut cleaned = String::new();
    let mut rest = expr;
    while let Some(at) = find_grouping(rest) {
        let (before, after) = rest.split_at(at.0);
        cleaned.push_str(before);
        cleaned.push(' ');
        rest = &after[at.1..];
    }
    cleaned.push_str(rest);
    metric_names(&cleaned)
}

/// The first grouping clause in `expr` (`by (...)`, `without (...)`, `on (...)`, `ignoring (...)`,
/// `group_left (...)`, `group_right (...)`): its start and length.
fn find_grouping(expr: &str) -> Option<(usize, usize)> {
    let lower = expr.to_ascii_lowercase();
    let mut best: Option<(usize, usize)> = None;
    for keyword in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
        let mut from = 0;
        while let Some(found) = lower[from..].find(keyword) {
            let start = from + found;
            let end = start + keyword.len();
            from = end;
            let boundary_before =
                lower[..start].chars().last().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            let after = lower[end..].trim_start();
            if !boundary_before || !after.starts_with('(') {
                continue;
            }
            let open = end + (lower[end..].len() - after.len());
            let Some(close) = lower[open..].find(')') else { continue };
            let length = open + close + 1 - start;
            if best.is_none_or(|(at, _)| start < at) {
                best = Some((start, length));
            }
            break;
        }
    }
    best
}

/// Families the exposition declares (`# TYPE name kind`) and the names its samples carry.
fn exported(text: &str) -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    let mut families = BTreeSet::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                families.insert((name.to_string(), kind.to_string()));
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            samples.insert(name.to_string());
        }
    }
    (families, samples)
}

/// Whether `name` is something `/metrics` exports: a sample's name, a declared family, or a
/// histogram's (`_bucket`, `_sum`, `_count`) or summary's (`_sum`, `_count`) series of a declared
/// family of that kind.
fn is_exported(name: &str, families: &BTreeSet<(String, String)>, samples: &BTreeSet<String>) -> bool {
    if samples.contains(name) || families.iter().any(|(family, _)| family == name) {
        return true;
    }
    let declared =
        |family: &str, kinds: &[&str]| families.iter().any(|(f, k)| f == family && kinds.contains(&k.as_str()));
    if let Some(family) = name.strip_suffix("_bucket") {
        return declared(family, &["histogram"]);
    }
    ["_sum", "_count"]
        .iter()
        .any(|suffix| name.strip_suffix(suffix).is_some_and(|family| declared(family, &["histogram", "summary"])))
}

#[test]
fn metric_names_are_taken_out_of_promql() {
    let cases: &[(&str, &[&str])] = &[
        ("hexa_links_open", &["hexa_links_open"]),
        ("sum by (health) (hexa_nodes)", &["hexa_nodes"]),
        (
            r#"histogram_quantile(0.99, sum by (le, plan) (rate(hexa_placement_seconds_bucket{plan=~"s.*",x="a}b"}[5m])))"#,
            &["hexa_placement_seconds_bucket"],
        ),
        (
            r#"sum by (part) (rate(a_sum{node=~"$node"}[5m])) / sum without (node) (rate(a_count[1m])) * 60"#,
            &["a_count", "a_sum"],
        ),
        ("rate(x_total[$__rate_interval]) > bool 1e3 or on (node) y", &["x_total", "y"]),
        ("max(b) by (node) + ignoring(le) group_left(plan) c offset 5m", &["b", "c"]),
    ];
    for (expr, expected) in cases {
        let names: Vec<String> = queried_metrics(expr).into_iter().collect();
        assert_eq!(names, *expected, "{expr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_queries_a_metric_the_coordinator_exports() {
    let dashboard = dashboard();

    // What Grafana needs of a dashboard it imports.
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()), "no title");
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()), "no uid");
    assert!(dashboard["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let ds_uid = format!("${{{}}}", datasource["name"].as_str().unwrap());

    let mut queried: Vec<(String, String)> = Vec::new();
    let all = panels(&dashboard);
    let mut graphs = 0;
    let mut ids = BTreeSet::new();
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "{title}: id used twice");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].as_u64().is_some(), "{title}: gridPos.{key}");
        }
        let kind = panel["type"].as_str().expect("panel type");
        if kind == "row" {
            continue;
        }
        graphs += 1;
        assert!(["timeseries", "stat", "gauge", "bargauge", "table", "heatmap"].contains(&kind), "{title}: {kind}");
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(panel["datasource"]["uid"], ds_uid.as_str(), "{title}: not the datasource variable");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("{title}: no targets"));
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            assert!(target["refId"].as_str().is_some(), "{title}: a target without refId");
            let names = queried_metrics(expr);
            assert!(!names.is_empty(), "{title}: {expr} reads no metric");
            queried.extend(names.into_iter().map(|n| (title.to_string(), n)));
        }
    }
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).expect("variable query");
        let inner = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(m, _)| m);
        let metric = inner.expect("label_values(metric, label)").trim();
        queried.extend(queried_metrics(metric).into_iter().map(|n| (format!("variable {}", variable["name"]), n)));
    }
    assert!(graphs >= 10, "{graphs} graphs");
    let names: BTreeSet<&str> = queried.iter().map(|(_, n)| n.as_str()).collect();
    for family in [
        "hexa_nodes",
        "hexa_reports_total",
        "hexa_report_lag_seconds_bucket",
        "hexa_placements_total",
        "hexa_placement_seconds_bucket",
        "hexa_tenants",
        "hexa_provisioning_vms",
        "hexa_isolation_apply_seconds_sum",
        "hexa_isolation_drift_repairs_total",
        "hexa_link_reconnects_total",
        "hexa_refusals_total",
    ] {
        assert!(names.contains(family), "the dashboard graphs nothing of {family}");
    }

    // A coordinator whose series all have samples: a node that reports and enforces isolation,
    // links a second time, a tenant placed on it, and a refused enrollment.
    let c = Coordinator::start_tuned(|config| {
        config.isolation.enabled = true;
        config.isolation.management_cidrs = vec!["192.0.2.0/24".into()];
    })
    .await;
    let agent = c.spawn_agent("dash-1").await;
    let ready = async || {
        let nodes = c.admin.nodes().await;
        nodes.iter().any(|n| n.name == "dash-1" && n.health == Health::Ready && n.allocatable.is_some()).then_some(())
    };
    eventually(Duration::from_secs(30), "the node Ready", ready).await;
    let plan =
        json!({"kind": "shared", "cpu_millis": 100, "memory_bytes": 1u64 << 28, "pods": 5, "replicas": 1, "spread": 1});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "dash", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(20), "the tenant's spec applied", async || {
        let node = c.admin.node("dash-1").await?;
        (node.applied_generation == Some(node.spec_generation) && !node.tenants.is_empty()).then_some(())
    })
    .await;
    // Linked again with the certificate it has.
    let config = agent.config.clone();
    agent.stop().await;
    let agent = Agent::spawn(config);
    let (_, refused) = raw::enroll_request("hxb_nope.nope", "stranger");
    let answer = raw::enroll(c.running.quic_addr, c.running.ca_hash, &refused).await;
    assert!(matches!(answer, Ok(hexa_shared::proto::EnrollResponse::Refused(_))), "{answer:?}");

    let text = eventually(Duration::from_secs(30), "every driven series in /metrics", async || {
        let text = c.admin.metrics().await;
        let driven = [
            "hexa_reports_total",
            "hexa_report_lag_seconds_count",
            "hexa_placements_total{plan=\"shared\"}",
            "hexa_placement_seconds_count{plan=\"shared\"}",
            "hexa_link_reconnects_total{node=\"dash-1\"}",
            "hexa_isolation_apply_seconds_count{node=\"dash-1\",part=\"firewall\"}",
            "hexa_links_open",
            "hexa_enrollments_total",
        ];
        let tenants = text.lines().any(|l| l.starts_with("hexa_tenants{") && !l.ends_with(" 0"));
        (tenants && driven.iter().all(|series| metric(&text, series) >= 1)).then_some(text)
    })
    .await;
    let (families, samples) = exported(&text);
    assert!(samples.contains("hexa_refusals_total"), "{text}");
    assert!(samples.contains("hexa_isolation_drift_repairs_total"), "{text}");
    assert!(samples.contains("hexa_provisioning_vms"), "{text}");
    let missing: Vec<String> = queried
        .iter()
        .filter(|(_, name)| !is_exported(name, &families, &samples))
        .map(|(title, name)| format!("{title}: {name}"))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries what /metrics does not export:\n{}\n\n{text}",
        missing.join("\n")
    );
    agent.stop().await;
}
