//! The embedded registrar served over HTTP (`node-agent registrar serve --listen ADDR`), so
//! several nodes can register with one. Reads are public; every write is signed (see
//! [`crate::auth`]): creating a twin by the key being registered, everything else by the twin
//! that owns what is written.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;

use super::local::LocalRegistrar;
use super::*;
use crate::api::ErrorBody;
use crate::auth::{AuthError, ReplayGuard, SignedHeaders, Signer};
use crate::routes::Routes;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

pub struct ServerState {
    pub registrar: LocalRegistrar,
    pub replays: ReplayGuard,
}

/// The registrar's OpenAPI document (the agent's document nests it under `/registrar`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "gridnode registrar",
        description = "Twins, farms, nodes and uptime reports. Reads are public; writes are signed."
    ),
    paths(
        create_twin,
        find_twin,
        get_twin,
        create_farm,
        get_farm,
        put_node,
        find_node,
        get_node,
        add_uptime,
        list_uptime
    ),
    components(schemas(Twin, Farm, FarmBody, NodeInfo, Node, UptimeReport))
)]
pub struct RegistrarDoc;

/// The registrar's routes.
pub fn routes(state: Arc<ServerState>) -> Routes {
    Routes::new()
        .post("/twins", create_twin)
        .get("/twins", find_twin)
        .get("/twins/{id}", get_twin)
        .post("/farms", create_farm)
        .get("/farms/{id}", get_farm)
        .post("/nodes", put_node)
        .get("/nodes", find_node)
        .get("/nodes/{id}", get_node)
        .post("/nodes/{id}/uptime", add_uptime)
        .get("/nodes/{id}/uptime", list_uptime)
        .map(|r| r.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY)))
        .with_state(state)
}

pub fn router(state: Arc<ServerState>) -> Router {
    routes(state).into_router()
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
        let status = match e {
            AuthError::Unavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError(status, e.to_string())
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

/// Registers the key that signs the request (`X-Grid-Signer: key:<hex>`) as a twin; the
/// body is empty.
#[utoipa::path(post, path = "/twins",
    request_body(content = String, content_type = "application/json", description = "ignored (`{}`)"),
    responses((status = 200, body = Twin), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TwinQuery {
    /// The twin's public key (its chain account: ed25519 or sr25519, 64 hex digits).
    public_key: String,
}

#[utoipa::path(get, path = "/twins", params(TwinQuery),
    responses((status = 200, body = Twin), (status = 404, body = ErrorBody)))]
async fn find_twin(
    State(s): State<Arc<ServerState>>,
    Query(q): Query<TwinQuery>,
) -> Result<Json<Twin>, ApiError> {
    s.registrar
        .twin_by_key_hex(&q.public_key.to_ascii_lowercase())?
        .map(Json)
        .ok_or_else(|| not_found(format!("no twin has key {}", q.public_key)))
}

#[utoipa::path(get, path = "/twins/{id}", params(("id" = u32, Path)),
    responses((status = 200, body = Twin), (status = 404, body = ErrorBody)))]
async fn get_twin(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Twin>, ApiError> {
    s.registrar
        .get_twin(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown twin {id}")))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct FarmBody {
    name: String,
}

/// Creates a farm owned by the signing twin.
#[utoipa::path(post, path = "/farms", request_body = FarmBody,
    responses((status = 200, body = Farm), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
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

#[utoipa::path(get, path = "/farms/{id}", params(("id" = u32, Path)),
    responses((status = 200, body = Farm), (status = 404, body = ErrorBody)))]
async fn get_farm(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Farm>, ApiError> {
    s.registrar
        .get_farm(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown farm {id}")))
}

/// Registers (or updates) the node of the signing twin.
#[utoipa::path(post, path = "/nodes", request_body = NodeInfo,
    responses((status = 200, body = Node), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct NodeQuery {
    twin_id: u32,
}

#[utoipa::path(get, path = "/nodes", params(NodeQuery),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
async fn find_node(
    State(s): State<Arc<ServerState>>,
    Query(q): Query<NodeQuery>,
) -> Result<Json<Node>, ApiError> {
    s.registrar
        .get_node_by_twin(q.twin_id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("twin {} has no node", q.twin_id)))
}

#[utoipa::path(get, path = "/nodes/{id}", params(("id" = u32, Path)),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
async fn get_node(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Node>, ApiError> {
    s.registrar
        .get_node(id)?
        .map(Json)
        .ok_or_else(|| not_found(format!("unknown node {id}")))
}

/// An uptime report of the node, signed by its twin.
#[utoipa::path(post, path = "/nodes/{id}/uptime", params(("id" = u32, Path)), request_body = UptimeReport,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
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

/// The node's last 100 uptime reports.
#[utoipa::path(get, path = "/nodes/{id}/uptime", params(("id" = u32, Path)),
    responses((status = 200, body = Vec<UptimeReport>)))]
async fn list_uptime(
    State(s): State<Arc<ServerState>>,
    Path(id): Path<u32>,
) -> Result<Json<Vec<UptimeReport>>, ApiError> {
    Ok(Json(s.registrar.uptime_reports(id, 100)?))
}
