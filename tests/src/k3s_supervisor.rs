//! A stand-in for the K3s server's supervisor endpoints that decide what a join token opens,
//! written from K3s' token documentation (docs.k3s.io/cli/token):
//!
//! - `GET /cacerts` serves the cluster's CA bundle to anyone: a node joining with a secure token
//!   (`K10<sha256 of this file>::<user>:<password>`) checks it against the hash before it sends
//!   any credential.
//! - `GET /v1-k3s/server-bootstrap` serves the cluster's CA keys and opens only to the server
//!   token (basic auth, user `server`).
//! - `GET /v1-k3s/client-kubelet.crt` is what any joining node fetches; the server token and the
//!   agent token (user `node`) both open it.
//!
//! Plain HTTP on loopback: the part under test is which credential opens which endpoint.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
struct Secrets {
    ca_pem: String,
    server: String,
    agent: String,
}

/// The supervisor of a K3s server holding `server` and `agent` secrets and the CA `ca_pem`.
#[derive(Debug)]
pub struct Supervisor {
    pub base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(value).ok()?).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

impl Supervisor {
    pub async fn start(ca_pem: &str, server_secret: &str, agent_secret: &str) -> Supervisor {
        let secrets =
            Secrets { ca_pem: ca_pem.to_string(), server: server_secret.to_string(), agent: agent_secret.to_string() };
        let app = Router::new()
            .route("/cacerts", get(|State(s): State<Secrets>| async move { s.ca_pem }))
            .route(
                "/v1-k3s/server-bootstrap",
                get(|State(s): State<Secrets>, headers: HeaderMap| async move {
                    match basic_credentials(&headers) {
                        Some((user, password)) if user == "server" && password == s.server => {
                            (StatusCode::OK, "{\"ServerCAKey\": \"...\"}")
                        }
                        _ => (StatusCode::UNAUTHORIZED, "Unauthorized"),
                    }
                }),
            )
            .route(
                "/v1-k3s/client-kubelet.crt",
                get(|State(s): State<Secrets>, headers: HeaderMap| async move {
                    match basic_credentials(&headers) {
                        Some((user, password))
                            if (user == "server" && password == s.server)
                                || (user == "node" && password == s.agent) =>
                        {
                            (StatusCode::OK, "-----BEGIN CERTIFICATE-----")
                        }
                        _ => (StatusCode::UNAUTHORIZED, "Unauthorized"),
                    }
                }),
            )
            .with_state(secrets);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind supervisor");
        let addr: SocketAddr = listener.local_addr().expect("supervisor address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Supervisor { base: format!("http://{addr}"), task }
    }

    /// Presents `token` as a K3s node would: a secure token first has the server's CA checked
    /// against its hash (a mismatch sends no credential at all); the credentials then go to `path`
    /// as basic auth. Returns the status, or the pin failure.
    pub async fn present(&self, token: &str, path: &str) -> Result<u16, String> {
        let http = reqwest::Client::new();
        let (user, password) = match token.strip_prefix("K10").and_then(|rest| rest.split_once("::")) {
            Some((ca_hash, credentials)) => {
                let ca = http.get(format!("{}/cacerts", self.base)).send().await.map_err(|e| e.to_string())?;
                let ca = ca.bytes().await.map_err(|e| e.to_string())?;
                let actual = hex::encode(Sha256::digest(&ca));
                if actual != ca_hash {
                    return Err(format!("CA hash mismatch: token pins {ca_hash}, server has {actual}"));
                }
                let (user, password) = credentials.split_once(':').ok_or("no user in the token")?;
                (user.to_string(), password.to_string())
            }
            // A short token is the server token's password alone.
            None => ("server".to_string(), token.to_string()),
        };
        let response = http
            .get(format!("{}{path}", self.base))
            .basic_auth(user, Some(password))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }
}
