//! The admin API as `hexactl` calls it: bearer token, JSON bodies, error bodies read into
//! [`CtlError::Api`].

use serde::de::DeserializeOwned;

use super::CtlError;

pub(super) struct Client {
    pub(super) http: reqwest::Client,
    pub(super) server: String,
    pub(super) token: String,
}

impl Client {
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CtlError> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let unreachable = |source| CtlError::Unreachable { server: self.server.clone(), source };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let field = |name: &str| parsed["error"][name].as_str().map(str::to_string);
            return Err(CtlError::Api {
                status: status.as_u16(),
                code: field("code").unwrap_or_default(),
                message: field("message").unwrap_or(text),
            });
        }
        serde_json::from_str(&text).map_err(|e| CtlError::Decode(e.to_string()))
    }
}
