//! The agent's HTTP + JSON API, served on a unix socket (mode 0600: its callers are root, the
//! node's operator, or sign as a twin) and optionally on TCP (every request signed by a twin,
//! see [`crate::auth`]; the embedded registrar's public reads aside). The OpenAPI document is
//! generated from the handlers (utoipa), the registrar's nested under `/registrar`, and served
//! at `/openapi.json`; the routes are added through [`Routes`], which lists what is served
//! for the test that compares the two.
//!
//! Who sees what: a twin sees and changes only its own deployments and reads only their logs;
//! the operator (unsigned, on the unix socket) gets the node's capacity and health, not
//! workload data.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{AuthError, ReplayGuard, SignedHeaders, Signer};
use crate::capacity::Resources;
use crate::console;
use crate::deployment::Deployment;
use crate::engine::{DeployError, DeployOutcome, Engine};
use crate::registrar::server::{RegistrarDoc, ServerState};
use crate::routes::Routes;
use crate::state::VmRecord;
use crate::vmspec::{VmKey, VmPaths};

/// Largest request body (a deployment).
pub const MAX_BODY: usize = 1 << 20;
/// Most console bytes per logs request.
pub const MAX_LOG_CHUNK: usize = 1 << 20;

pub struct ApiState {
    pub engine: Arc<Engine>,
    pub node_key: String,
    pub replays: ReplayGuard,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gridnode node agent",
        description = "Deployments of micro-VMs on a grid node."
    ),
    paths(
        node_status,
        metrics,
        create_deployment,
        list_deployments,
        get_deployment,
        update_deployment,
        delete_deployment,
        vm_logs,
        openapi_json
    ),
    components(schemas(
        NodeStatus,
        DeploymentStatus,
        DeployOutcome,
        ErrorBody,
        Deployment,
        VmRecord,
        Resources,
        crate::hostmem::NodeMemory
    )),
    nest((path = "/registrar", api = RegistrarDoc))
)]
pub struct ApiDoc;

/// The agent's own routes; `tcp` requires every request to be signed.
pub fn routes(state: Arc<ApiState>, tcp: bool) -> Routes {
    let state = Arc::new(Served { state, tcp });
    Routes::new()
        .get("/openapi.json", openapi_json)
        .get("/node", node_status)
        .get("/metrics", metrics)
        .get("/deployments", list_deployments)
        .post("/deployments", create_deployment)
        .get("/deployments/{id}", get_deployment)
        .put("/deployments/{id}", update_deployment)
        .delete("/deployments/{id}", delete_deployment)
        .get("/deployments/{id}/vms/{name}/logs", vm_logs)
        .map(|r| {
            r.fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        })
        .with_state(state)
}

/// The agent's routes only (no registrar).
pub fn router(state: Arc<ApiState>, tcp: bool) -> Router {
    routes(state, tcp).into_router()
}

/// What the agent serves on its unix socket (`tcp` false) or TCP: its routes, and, with an
/// embedded registrar, that registrar under `/registrar` (on TCP: its reads and twin
/// creation only; farms, nodes and uptime are written by this node, through the socket).
pub fn app(state: Arc<ApiState>, tcp: bool, registrar: Option<Arc<ServerState>>) -> Routes {
    let mut app = routes(state, tcp);
    if let Some(reg) = registrar {
        let mut inner = crate::registrar::server::routes(reg);
        if tcp {
            inner =
                inner.map(|r| r.layer(axum::middleware::from_fn(registrar_reads_and_twins_only)));
        }
        app = app.nest("/registrar", inner);
    }
    app
}

/// The embedded registrar on TCP: its public reads, and twin creation (signed by the key
/// being registered, checked by the registrar).
async fn registrar_reads_and_twins_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = req.method() == Method::GET
        || (req.method() == Method::POST && req.uri().path() == "/twins");
    if allowed {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::FORBIDDEN,
            "on TCP this registrar serves reads and twin creation only".into(),
        )
        .into_response()
    }
}

pub struct Served {
    state: Arc<ApiState>,
    tcp: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
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

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let status = match &e {
            DeployError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DeployError::Forbidden(_) => StatusCode::FORBIDDEN,
            DeployError::NotFound(_) => StatusCode::NOT_FOUND,
            DeployError::Conflict(_) => StatusCode::CONFLICT,
            DeployError::Capacity(_) => StatusCode::INSUFFICIENT_STORAGE,
            DeployError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            DeployError::Failed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DeployError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// Runs a change of the node to its end in a task of its own: a client that goes away (a
/// timeout while VMs take their shutdown grace) does not cut it off half-way.
async fn to_end<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, DeployError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(change).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change ended abnormally: {e}"),
        )),
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Operator,
    Twin(u32),
}

impl Caller {
    fn twin(self) -> Result<u32, ApiError> {
        match self {
            Caller::Twin(t) => Ok(t),
            Caller::Operator => Err(ApiError(
                StatusCode::FORBIDDEN,
                "the node operator sees capacity and health, not workloads: sign the request as the owner twin".into(),
            )),
        }
    }
}

async fn authenticate(
    s: &Served,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Caller, ApiError> {
    let signed = SignedHeaders::parse(|name| headers.get(name).and_then(|v| v.to_str().ok()))?;
    let Some(signed) = signed else {
        if s.tcp {
            return Err(AuthError::Unsigned(crate::auth::H_SIGNATURE).into());
        }
        return Ok(Caller::Operator);
    };
    let Signer::Twin(twin) = signed.signer else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "requests are signed by a twin (twin:<id>)".into(),
        ));
    };
    let key = s
        .state
        .engine
        .registrar
        .twin(twin)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the signature: {e}"),
            )
        })?
        .and_then(|t| t.key())
        .ok_or(AuthError::UnknownTwin(twin))?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    signed.verify(
        &key,
        method.as_str(),
        path,
        body,
        crate::auth::now_unix(),
        &s.state.replays,
    )?;
    Ok(Caller::Twin(twin))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The node's ed25519 public key (hex).
    pub node_key: String,
    pub twin_id: Option<u32>,
    pub node_id: Option<u32>,
    pub registered: bool,
    pub capacity_total: Resources,
    pub capacity_used: Resources,
    pub workloads: usize,
    pub uptime_reports_pending: usize,
    pub last_uptime_report: i64,
    /// The registrar's (the chain's) last error, `null` once it works again.
    pub registrar_error: Option<String>,
    /// What the node's memory is spent on now.
    pub memory: crate::hostmem::NodeMemory,
}

#[utoipa::path(get, path = "/node", responses((status = 200, body = NodeStatus), (status = 401, body = ErrorBody)))]
async fn node_status(
    State(s): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<NodeStatus>, ApiError> {
    authenticate(&s, &method, &uri, &headers, b"").await?;
    let e = &s.state.engine;
    let vms = e.store.vms(None)?;
    let memory = crate::hostmem::NodeMemory::measure(&vms);
    let meta = |k: &str| e.store.meta(k).ok().flatten().and_then(|v| v.parse().ok());
    Ok(Json(NodeStatus {
        node_key: s.state.node_key.clone(),
        twin_id: meta("twin_id"),
        node_id: meta("node_id"),
        registered: e
            .metrics
            .registered
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1,
        capacity_total: e.capacity,
        capacity_used: e.used(None)?,
        workloads: vms.len(),
        uptime_reports_pending: e.store.pending_uptime()?.len(),
        last_uptime_report: e
            .metrics
            .last_uptime_report
            .load(std::sync::atomic::Ordering::Relaxed),
        registrar_error: e.metrics.registrar_error(),
        memory,
    }))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
async fn metrics(
    State(s): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&s, &method, &uri, &headers, b"").await?;
    let e = &s.state.engine;
    let vms = e.store.vms(None)?;
    let mut text = e.metrics.render(
        &vms,
        e.used(None)?,
        e.capacity,
        e.store.pending_uptime()?.len(),
    );
    crate::hostmem::NodeMemory::measure(&vms).render(&mut text);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeploymentStatus {
    pub deployment: Deployment,
    pub vms: Vec<VmRecord>,
    /// Each VM's interfaces as the guest sees them (`eth0 10.249.0.2/16`), for VMs that
    /// have any.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub addresses: std::collections::BTreeMap<String, Vec<String>>,
    /// While a change runs: what each of its VMs is doing (its images checked or fetched,
    /// its vmm started, the VM being built), by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub steps: std::collections::BTreeMap<String, String>,
}

fn parse_deployment(body: &[u8]) -> Result<Deployment, ApiError> {
    Deployment::from_json(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

#[utoipa::path(post, path = "/deployments", request_body = Deployment,
    responses((status = 201, body = DeployOutcome), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 507, body = ErrorBody)))]
async fn create_deployment(
    State(s): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, &body)
        .await?
        .twin()?;
    let doc = parse_deployment(&body)?;
    if let Some(row) = s
        .state
        .engine
        .store
        .deployment(doc.twin_id, doc.deployment_id)?
    {
        if !row.deleted {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "deployment {} exists: update it with PUT",
                    doc.deployment_id
                ),
            ));
        }
    }
    let engine = s.state.engine.clone();
    let out = to_end(async move { engine.deploy(twin, doc).await }).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[utoipa::path(put, path = "/deployments/{id}", request_body = Deployment, params(("id" = u64, Path)),
    responses((status = 200, body = DeployOutcome), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn update_deployment(
    State(s): State<Arc<Served>>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<DeployOutcome>, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, &body)
        .await?
        .twin()?;
    let doc = parse_deployment(&body)?;
    if doc.deployment_id != id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is deployment {}, the path {id}",
                doc.deployment_id
            ),
        ));
    }
    match s.state.engine.store.deployment(twin, id)? {
        Some(row) if !row.deleted => {}
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no deployment {id} of twin {twin}: create it with POST"),
            ))
        }
    }
    let engine = s.state.engine.clone();
    Ok(Json(
        to_end(async move { engine.deploy(twin, doc).await }).await?,
    ))
}

#[utoipa::path(get, path = "/deployments", responses((status = 200, body = Vec<DeploymentStatus>), (status = 403, body = ErrorBody)))]
async fn list_deployments(
    State(s): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<DeploymentStatus>>, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, b"")
        .await?
        .twin()?;
    let e = &s.state.engine;
    let mut out = Vec::new();
    for d in e.store.deployments(Some(twin))? {
        let vms = e.store.vms(Some((twin, d.deployment_id)))?;
        let addresses = e.vm_addresses(&d);
        out.push(DeploymentStatus {
            steps: e.steps(twin, d.deployment_id),
            deployment: d,
            vms,
            addresses,
        });
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/deployments/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = DeploymentStatus), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_deployment(
    State(s): State<Arc<Served>>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<DeploymentStatus>, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, b"")
        .await?
        .twin()?;
    let e = &s.state.engine;
    let row = e.store.deployment(twin, id)?.filter(|r| !r.deleted);
    let Some(row) = row else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no deployment {id} of twin {twin}"),
        ));
    };
    Ok(Json(DeploymentStatus {
        steps: e.steps(twin, id),
        addresses: e.vm_addresses(&row.doc),
        deployment: row.doc,
        vms: e.store.vms(Some((twin, id)))?,
    }))
}

#[utoipa::path(delete, path = "/deployments/{id}", params(("id" = u64, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_deployment(
    State(s): State<Arc<Served>>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, b"")
        .await?
        .twin()?;
    let engine = s.state.engine.clone();
    to_end(async move { engine.delete(twin, twin, id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Where to continue: the `x-next-cursor` of the previous answer (without it, from the
    /// oldest output kept). A cursor stays valid across rotations of the console log and
    /// restarts of the VM (see `console.rs`).
    pub cursor: Option<String>,
}

/// Header naming where the next logs request continues.
pub const NEXT_CURSOR: &str = "x-next-cursor";
/// Header set (`1`) when output between the request's cursor and the answer is no longer kept.
pub const LOG_GAP: &str = "x-log-gap";

#[utoipa::path(get, path = "/deployments/{id}/vms/{name}/logs", params(("id" = u64, Path), ("name" = String, Path), LogQuery),
    responses((status = 200, description = "console bytes; `x-next-cursor` says where to continue, `x-log-gap: 1` that output before them was rotated away unread", content_type = "application/octet-stream"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn vm_logs(
    State(s): State<Arc<Served>>,
    Path((id, name)): Path<(u64, String)>,
    Query(q): Query<LogQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let twin = authenticate(&s, &method, &uri, &headers, b"")
        .await?
        .twin()?;
    let cursor = q
        .cursor
        .as_deref()
        .map(console::Cursor::parse)
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let e = &s.state.engine;
    let known = e
        .store
        .deployment(twin, id)?
        .filter(|r| !r.deleted)
        .is_some_and(|r| r.doc.vm(&name).is_some());
    if !known {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("twin {twin} has no VM {name} in deployment {id}"),
        ));
    }
    let key = VmKey {
        twin_id: twin,
        deployment_id: id,
        name,
    };
    let paths = VmPaths::new(&e.config.state_dir, &key);
    let chunk = console::read(&paths.console, cursor, MAX_LOG_CHUNK)?;
    let mut resp = (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        chunk.bytes,
    )
        .into_response();
    let h = resp.headers_mut();
    if let Some(next) = chunk.next {
        if let Ok(v) = header::HeaderValue::from_str(&next.to_string()) {
            h.insert(NEXT_CURSOR, v);
        }
    }
    if chunk.gap {
        h.insert(LOG_GAP, header::HeaderValue::from_static("1"));
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "this document"), (status = 401, body = ErrorBody)))]
async fn openapi_json(
    State(s): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<utoipa::openapi::OpenApi>, ApiError> {
    authenticate(&s, &method, &uri, &headers, b"").await?;
    Ok(Json(ApiDoc::openapi()))
}
