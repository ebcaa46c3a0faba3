//! The embedded registrar served over HTTP (`node-agent registrar serve --listen ADDR`), so
//! several nodes can register with one. Reads are public; every write is signed (see
//! [`crate::auth`]): creating a twin by the key being registered, everything else by the twin
//! that owns what is written.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::local::LocalRegistrar;
use super::*;
use crate::auth::{AuthError, ReplayGuard, SignedHeaders, Signer};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

pub struct ServerState {
    pub registrar: LocalRegistrar,
    pub replays: ReplayGuard,
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/twins", post(create_twin).get(find_twin))
        .route("/twins/{id}", get(get_twin))
        .route("/farms", post(create_farm))
        .route("/farms/{id}", get(get_farm))
        .route("/nodes", post(put_node).get(find_node))
        .route("/nodes/{id}", get(get_node))
        .route("/nodes/{id}/uptime", post(add_uptime).get(list_uptime))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistrarError> for ApiError {
    fn from(e: RegistrarError) -> Self {
        let status = match e {
            RegistrarError::Refused(_) => StatusCode::FORBIDDEN,
            RegistrarError::UnknownFarm(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError(StatusCode::UNAUTHORIZED, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

/// Checks a write's signature; returns who signed it.
fn signer(
    s: &ServerState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Signer, ApiError> {
    let signed = SignedHeaders::parse(|name| headers.get(name).and_then(|v| v.to_str().ok()))?
        .ok_or(AuthError::Unsigned(crate::auth::H_SIGNATURE))?;
    let key = match &signed.signer {
        Signer::Key(k) => *k,
        Signer::Twin(id) => s
            .registrar
            .get_twin(*id)?
            .and_then(|t| t.key())
            .ok_or(AuthError::UnknownTwin(*id))?,
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    signed.verify(
        &key,
        method.as_str(),
        path,
        body,
        crate::auth::now_unix(),
        &s.replays,
    )?;
    Ok(signed.signer)
}

fn signer_twin(signer: Signer) -> Result<TwinId, ApiError> {
    match signer {
        Signer::Twin(id) => Ok(id),
        Signer::Key(_) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this write must be signed by a twin".into(),
        )),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed body: {e}")))
}

async fn create_twin(
    State(s): State<Arc<ServerState>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Twin>, ApiError> {
    match signer(&s, &method, &uri, &headers, &body)? {
        Signer::Key(k) => Ok(Json(s.registrar.add_twin(&k)?)),
        Signer::Twin(_) => Err(bad(
            "a twin is created by a request signed with key:<its public key>",
        )),
    }
}

#[derive(Deserialize)]
struct TwinQuery {
    public_key: String,
}

async fn find_twin(
    State(s): State<Arc<ServerState>>,
    Query(q): Query<TwinQuery>,
) -> Result<Json<Twin>, ApiError> {
    s.registrar
        .twin_by_key_hex(&q.public_key.to_ascii_lowercase())?
        .map(Json)
        .ok_or_else(|| not_found(format!("no twin has key {}", q.public_key)))
}

async fn get_twin(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Twin>, ApiError> {
    s.registrar
        .get_twin(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown twin {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FarmBody {
    name: String,
}

async fn create_farm(
    State(s): State<Arc<ServerState>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Farm>, ApiError> {
    let twin = signer_twin(signer(&s, &method, &uri, &headers, &body)?)?;
    let req: FarmBody = parse(&body)?;
    Ok(Json(s.registrar.add_farm(twin, &req.name)?))
}

async fn get_farm(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Farm>, ApiError> {
    s.registrar
        .get_farm(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown farm {id}")))
}

async fn put_node(
    State(s): State<Arc<ServerState>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Node>, ApiError> {
    let twin = signer_twin(signer(&s, &method, &uri, &headers, &body)?)?;
    let info: NodeInfo = parse(&body)?;
    Ok(Json(s.registrar.put_node(twin, &info)?))
}

#[derive(Deserialize)]
struct NodeQuery {
    twin_id: u32,
}

async fn find_node(
    State(s): State<Arc<ServerState>>,
    Query(q): Query<NodeQuery>,
) -> Result<Json<Node>, ApiError> {
    s.registrar
        .get_node_by_twin(q.twin_id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("twin {} has no node", q.twin_id)))
}

async fn get_node(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Node>, ApiError> {
    s.registrar
        .get_node(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown node {id}")))
}

async fn add_uptime(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let twin = signer_twin(signer(&s, &method, &uri, &headers, &body)?)?;
    let report: UptimeReport = parse(&body)?;
    s.registrar.add_uptime(twin, id, &report)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_uptime(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Vec<UptimeReport>>, ApiError> {
    Ok(Json(s.registrar.uptime_reports(id, 100)?))
}
