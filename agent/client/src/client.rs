//! A small client of weftd's API over its unix socket (used by the CLI and tests).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use weft_api::ErrorBody;
use weft_api::ACTOR_HEADER;

/// Largest response body the client accepts.
const MAX_BODY: usize = 64 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// weftd's socket cannot be reached.
    #[error("cannot reach weftd at {path}: {source} (is weftd running? start it with `systemctl start weftd`, or pass --socket)")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to weftd: {0}")]
    Http(String),
    /// weftd refused or failed the request.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// weftd's one-line reason.
        message: String,
    },
}

/// Client of one weftd.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    actor: Option<String>,
}

impl Client {
    /// A client of the weftd listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            actor: None,
        }
    }

    /// Names who acts, recorded in the audit log next to the socket's user.
    pub fn with_actor(mut self, actor: Option<String>) -> Client {
        self.actor = actor;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.request(Method::GET, path, None::<&()>).await?;
        decode(&bytes)
    }

    /// `POST path` with a JSON body, decoded as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = self.request(Method::POST, path, Some(body)).await?;
        decode(&bytes)
    }

    /// A request with a JSON body and method, decoded as `T`.
    pub async fn request_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = self.request(method, path, Some(body)).await?;
        decode(&bytes)
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.request(Method::DELETE, path, None::<&()>).await?;
        Ok(())
    }

    /// Sends one request and returns the body of a successful response.
    pub async fn request<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Http(e.to_string()))?,
            None => Vec::new(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "weftd");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(actor) = &self.actor {
            builder = builder.header(ACTOR_HEADER, actor);
        }
        let request = builder
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = response.status();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("weftd answered {status}"));
        Err(ClientError::Api { status, message })
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClientError::Http(format!("unexpected answer from weftd: {e}")))
}
