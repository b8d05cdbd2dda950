//! A small client for the coordinator's admin API, which keeps every answer it gets, and the
//! contract those answers are held to: the API's own OpenAPI document.

use std::sync::{Arc, Mutex};

use hexa_coordinator::inventory::NodeView;
use serde_json::Value;

/// One answer of the admin API, as a client received it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: reqwest::Method,
    /// The path asked for, without the query.
    pub path: String,
    pub status: u16,
    pub content_type: Option<String>,
    /// The body: JSON when it parses as JSON, else the text as a JSON string.
    pub body: Value,
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
}

impl AdminClient {
    pub fn new(base: String, token: String) -> Self {
        AdminClient { base, token, http: reqwest::Client::new(), exchanges: Arc::default() }
    }

    /// The same server with another bearer token (empty: none); its answers are kept with this
    /// client's.
    pub fn with_token(&self, token: &str) -> AdminClient {
        AdminClient { token: token.to_string(), ..self.clone() }
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request_raw(method, path, body).await.expect("admin API reachable")
    }

    /// Like [`request`](Self::request), but a coordinator that is not there is an `Err`.
    pub async fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.send(method, path, body).await.map(|e| (e.status, e.body))
    }

    /// Sends `body` with the given content type, byte for byte (too large, not JSON, ...).
    pub async fn request_bytes(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let exchange = self.send(method, path, Some((content_type, body))).await.expect("admin API reachable");
        (exchange.status, exchange.body)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Exchange, reqwest::Error> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let path = path.split('?').next().unwrap_or(path).to_string();
        let exchange = Exchange { method, path, status, content_type, body };
        self.exchanges.lock().unwrap_or_else(|e| e.into_inner()).push(exchange.clone());
        Ok(exchange)
    }

    /// Every answer this client (and its [`with_token`](Self::with_token) siblings) received.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        let (status, body) = self.request(reqwest::Method::GET, "/v1/nodes", None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("node list")
    }

    pub async fn node(&self, name: &str) -> Option<NodeView> {
        self.nodes().await.into_iter().find(|n| n.name == name)
    }

    /// Mints a token for `pool` with `ttl` and returns it.
    pub async fn token(&self, pool: &str, ttl: &str) -> String {
        let (status, body) = self
            .request(reqwest::Method::POST, "/v1/tokens", Some(serde_json::json!({"pool": pool, "ttl": ttl})))
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token in response").to_string()
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.request(reqwest::Method::GET, "/metrics", None).await;
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_string()
    }
}

/// Reads one sample's value from Prometheus text, e.g. `hexa_refusals_total{reason="token_used"}`.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0)
}

/// The admin API's OpenAPI document as a contract answers are checked against: the operation a
/// request reached (by path template and method), the response it documents for the status, the
/// media type, and the body against that response's schema.
///
/// Response schemas are checked strictly: an object with `properties` and no
/// `additionalProperties` of its own admits no other field, so a handler that returns a field the
/// document lacks fails as surely as one that returns an undocumented status.
#[derive(Debug)]
pub struct Contract {
    document: Value,
    /// `components/schemas`, made strict, as `$defs` of every schema validated.
    defs: Value,
}

impl Contract {
    pub fn new(document: Value) -> Contract {
        let mut defs = document["components"]["schemas"].clone();
        strict(&mut defs);
        Contract { document, defs }
    }

    /// The document's operations, as (path template, method).
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut operations = Vec::new();
        for (path, item) in self.document["paths"].as_object().into_iter().flatten() {
            for (method, _) in item.as_object().into_iter().flatten() {
                if METHODS.contains(&method.as_str()) {
                    operations.push((path.clone(), method.clone()));
                }
            }
        }
        operations
    }

    /// The operation `method path` reaches: its path template and its object, if the path exists.
    pub fn operation(&self, method: &str, path: &str) -> Option<(String, Option<&Value>)> {
        let paths = self.document["paths"].as_object()?;
        let segments: Vec<&str> = path.split('/').collect();
        let matches = |template: &str| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
        };
        // A literal path wins over a template that also matches.
        let template = paths.keys().find(|t| *t == path).or_else(|| paths.keys().find(|t| matches(t)))?;
        Some((template.clone(), paths[template].get(method.to_ascii_lowercase())))
    }

    /// Why `exchange` is not an answer the document describes, if it is not.
    pub fn check(&self, exchange: &Exchange) -> Result<(), String> {
        let what = format!("{} {} -> {}", exchange.method, exchange.path, exchange.status);
        let response = match self.operation(exchange.method.as_str(), &exchange.path) {
            // No such path: the catch-all 404, with the error envelope.
            None if exchange.status == 404 => {
                return self.validate(&what, &json_ref("Error"), exchange);
            }
            None => return Err(format!("{what}: the path is not in the document")),
            Some((template, Some(operation))) => {
                let response = &operation["responses"][exchange.status.to_string()];
                if !response.is_object() {
                    return Err(format!("{what}: status {} is not documented for {template}", exchange.status));
                }
                response
            }
            // The path exists without this method: every operation of the path documents the 405.
            Some((template, None)) => {
                let item = &self.document["paths"][&template];
                let response = METHODS
                    .iter()
                    .find_map(|m| item.get(*m).map(|op| &op["responses"][exchange.status.to_string()]))
                    .filter(|r| r.is_object() && exchange.status == 405);
                response.ok_or_else(|| {
                    format!("{what}: {template} has no such method and the answer is not a documented 405")
                })?
            }
        };
        let response = self.resolve(response);
        let content = response["content"].as_object();
        let Some(content) = content.filter(|c| !c.is_empty()) else {
            return match &exchange.body {
                Value::String(s) if s.is_empty() => Ok(()),
                body => Err(format!("{what}: the document gives this response no body, got {body}")),
            };
        };
        let media = exchange.content_type.as_deref().unwrap_or_default();
        let media = media.split(';').next().unwrap_or_default().trim();
        let Some(documented) = content.get(media) else {
            return Err(format!(
                "{what}: content type {media:?} is not documented (documented: {:?})",
                content.keys().collect::<Vec<_>>()
            ));
        };
        let schema = documented.get("schema").cloned().unwrap_or(Value::Bool(true));
        self.validate(&what, &schema, exchange)
    }

    fn resolve<'a>(&'a self, response: &'a Value) -> &'a Value {
        match response.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/")) {
            Some(pointer) => self.document.pointer(&format!("/{pointer}")).unwrap_or(&Value::Null),
            None => response,
        }
    }

    fn validate(&self, what: &str, schema: &Value, exchange: &Exchange) -> Result<(), String> {
        let mut schema = schema.clone();
        strict(&mut schema);
        let mut root = match schema {
            Value::Object(map) => map,
            other => {
                let mut map = serde_json::Map::new();
                map.insert("allOf".into(), Value::Array(vec![other]));
                map
            }
        };
        root.insert("$defs".into(), self.defs.clone());
        let text = Value::Object(root).to_string().replace("\"#/components/schemas/", "\"#/$defs/");
        let root: Value = serde_json::from_str(&text).map_err(|e| format!("{what}: {e}"))?;
        let validator = jsonschema::draft202012::new(&root).map_err(|e| format!("{what}: bad schema: {e}"))?;
        let errors: Vec<String> =
            validator.iter_errors(&exchange.body).map(|e| format!("{}: {e}", e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: the body does not match the document: {}\nbody: {}", errors.join("; "), exchange.body))
        }
    }
}

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn json_ref(schema: &str) -> Value {
    serde_json::json!({"$ref": format!("#/components/schemas/{schema}")})
}

/// Makes every object schema with `properties` and no `additionalProperties` closed.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, value) in map.iter_mut() {
                // Property names and examples are data, not schemas.
                if key != "example" && key != "examples" && key != "enum" && key != "const" {
                    strict(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}
