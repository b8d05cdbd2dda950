//! A small client for the coordinator's admin API.

use hexa_coordinator::inventory::NodeView;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct AdminClient {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(base: String, token: String) -> Self {
        AdminClient { base, token, http: reqwest::Client::new() }
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
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
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
