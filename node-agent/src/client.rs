//! A small HTTP/1.1 client for the agent's API and for remote registrars, over a unix socket
//! or TCP (`http://host:port`), signing requests (see [`crate::auth`]) when given a key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::auth::{self, Signer};
use crate::identity::KeyPair;

/// Largest response body read.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

impl Endpoint {
    /// `http://host:port` (no path), `unix:/path`, or an absolute socket path.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("http://") {
            let hostport = rest.trim_end_matches('/');
            if hostport.is_empty() || hostport.contains('/') {
                bail!("endpoint {s:?}: expected http://host:port");
            }
            return Ok(Endpoint::Tcp(hostport.to_string()));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if !path.starts_with('/') {
            bail!("endpoint {s:?}: expected http://host:port, unix:/path or /path");
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(h) => write!(f, "http://{h}"),
        }
    }
}

pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("unexpected answer: {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `error` field of a JSON error body, or the body.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.text())
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    signer: Option<(KeyPair, Signer)>,
    timeout: Duration,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            signer: None,
            timeout: TIMEOUT,
        }
    }

    /// Waits up to `timeout` for each answer (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Signs every request with `key` as `signer`.
    pub fn signed(mut self, key: KeyPair, signer: Signer) -> Self {
        self.signer = Some((key, signer));
        self
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response> {
        tokio::time::timeout(self.timeout, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "{} {method} {path}: no answer in {} s",
                    self.endpoint,
                    self.timeout.as_secs()
                )
            })?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response> {
        let body = body.unwrap_or_default();
        let mut req = hyper::Request::builder().method(method).uri(path);
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Tcp(h) => h.clone(),
        };
        req = req.header("host", host);
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        if let Some((key, signer)) = &self.signer {
            for (name, value) in auth::sign(key, signer, method, path, &body, auth::now_unix()) {
                req = req.header(name, value);
            }
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let resp = match &self.endpoint {
            Endpoint::Unix(p) => {
                let stream = tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(|| format!("connecting to {}", p.display()))?;
                send(TokioIo::new(stream), req).await?
            }
            Endpoint::Tcp(h) => {
                let stream = tokio::net::TcpStream::connect(h.as_str())
                    .await
                    .with_context(|| format!("connecting to {h}"))?;
                send(TokioIo::new(stream), req).await?
            }
        };
        Ok(resp)
    }
}

async fn send<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> Result<Response>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}
