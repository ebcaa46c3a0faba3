//! The agent's API in-process (router, SQLite state, embedded registrar; no VM is started):
//! every route of the OpenAPI document answers, and forged, replayed, unsigned, over-capacity
//! and malformed deployments, a twin acting for another, and the operator asking for workload
//! data are refused with their reason and change nothing.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use node_agent::api::{self, ApiDoc, ApiState};
use node_agent::auth::{self, ReplayGuard, Signer};
use node_agent::capacity::Resources;
use node_agent::config::AgentConfig;
use node_agent::deployment::{Deployment, FailurePolicy, Workload};
use node_agent::engine::Engine;
use node_agent::identity::KeyPair;
use node_agent::metrics::Metrics;
use node_agent::registrar::local::LocalRegistrar;
use node_agent::state::{OpKind, Store};
use tower::ServiceExt;
use utoipa::OpenApi;

struct Node {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    store: Arc<Store>,
    app: axum::Router,
    owner: KeyPair,
    owner_id: u32,
    other: KeyPair,
    other_id: u32,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().to_path_buf();
    let store = Arc::new(Store::open(&state_dir.join("agent.db")).unwrap());
    let registrar = LocalRegistrar::new(store.clone());
    let owner = KeyPair::generate();
    let other = KeyPair::generate();
    let owner_id = registrar.add_twin(&owner.public()).unwrap().id;
    let other_id = registrar.add_twin(&other.public()).unwrap().id;
    let config = AgentConfig {
        state_dir: state_dir.clone(),
        ..Default::default()
    };
    let capacity = Resources {
        cru: 4,
        mru: 4 << 30,
        sru: 100 << 30,
        hru: 0,
    };
    let engine = Arc::new(Engine::new(
        store.clone(),
        config,
        Arc::new(registrar),
        Arc::new(Metrics::default()),
        capacity,
    ));
    let state = Arc::new(ApiState {
        engine,
        node_key: "k".into(),
        replays: ReplayGuard::default(),
    });
    let app = api::router(state, false);
    Node {
        _dir: dir,
        state_dir,
        store,
        app,
        owner,
        owner_id,
        other,
        other_id,
    }
}

fn deployment(twin_id: u32, version: u32) -> Deployment {
    common::unbootable_deployment(twin_id, 7, version, "", FailurePolicy::Rollback)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Vec<u8>,
    signer: Option<(&KeyPair, u32)>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some((key, twin)) = signer {
        for (h, v) in auth::sign(
            key,
            &Signer::Twin(twin),
            method,
            path,
            &body,
            auth::now_unix(),
        ) {
            req = req.header(h, v);
        }
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Nothing changed: no active deployment besides `expect`, no op, no VM, no VM files.
fn unchanged(n: &Node, expect: &[Deployment]) {
    assert_eq!(n.store.deployments(None).unwrap(), expect);
    assert!(n.store.ops().unwrap().is_empty());
    assert!(n.store.vms(None).unwrap().is_empty());
    assert!(!n.state_dir.join("vms").exists(), "VM files were made");
}

#[tokio::test]
async fn every_documented_route_answers_and_others_are_404() {
    let n = node();
    let doc = ApiDoc::openapi();
    let mut count = 0;
    for (path, item) in &doc.paths.paths {
        let concrete = path.replace("{id}", "7").replace("{name}", "web");
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PUT", item.put.is_some()),
            ("DELETE", item.delete.is_some()),
        ];
        for (m, present) in methods {
            if !present {
                continue;
            }
            count += 1;
            let (status, body) = call(
                &n.app,
                m,
                &concrete,
                b"{}".to_vec(),
                Some((&n.owner, n.owner_id)),
            )
            .await;
            assert!(
                status != StatusCode::NOT_FOUND || body.contains("deployment"),
                "{m} {path} is documented but not routed: {status} {body}"
            );
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
        }
    }
    assert!(count >= 8, "only {count} documented operations");
    let (status, body) = call(&n.app, "GET", "/nope", vec![], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("error"));
    // The document served is the generated one.
    let (status, body) = call(&n.app, "GET", "/openapi.json", vec![], None).await;
    assert_eq!(status, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        served["paths"].as_object().unwrap().len(),
        doc.paths.paths.len()
    );
}

#[tokio::test]
async fn bad_deployments_are_refused_with_their_reason_and_change_nothing() {
    let n = node();
    let mut good = deployment(n.owner_id, 1);
    good.sign(n.owner_id, &n.owner);

    // Unsigned document.
    let unsigned = deployment(n.owner_id, 1);
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&unsigned).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("not signed"), "{b}");
    unchanged(&n, &[]);

    // Unsigned request.
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&good).unwrap(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("operator"), "{b}");
    unchanged(&n, &[]);

    // Forged: signed by another twin's key under the owner's id, or changed after signing.
    let mut forged = deployment(n.owner_id, 1);
    forged.sign(n.owner_id, &n.other);
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&forged).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("no valid signature of the owner"), "{b}");
    let mut tampered = good.clone();
    tampered.workloads = deployment(n.owner_id, 1).workloads;
    let Workload::Vm(vm) = &mut tampered.workloads[0] else {
        unreachable!()
    };
    vm.memory_mib = 512;
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&tampered).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    unchanged(&n, &[]);

    // Another twin deploying for the owner.
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&good).unwrap(),
        Some((&n.other, n.other_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("only the owner"), "{b}");
    unchanged(&n, &[]);

    // Request signature by the wrong key.
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&good).unwrap(),
        Some((&n.other, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    unchanged(&n, &[]);

    // Over capacity.
    let mut big = deployment(n.owner_id, 1);
    let Workload::Vm(vm) = &mut big.workloads[0] else {
        unreachable!()
    };
    vm.vcpus = 8;
    big.sign(n.owner_id, &n.owner);
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&big).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{b}");
    assert!(b.contains("cru (vCPUs): needs 8, 4 free"), "{b}");
    unchanged(&n, &[]);

    // Malformed: not JSON, unknown field, invalid value.
    for (body, why) in [
        (b"{not json".to_vec(), "malformed"),
        (
            br#"{"twin_id":1,"deployment_id":7,"version":1,"workloads":[],"extra":1}"#.to_vec(),
            "unknown field",
        ),
        (
            br#"{"twin_id":1,"deployment_id":7,"version":1,"workloads":[]}"#.to_vec(),
            "no workloads",
        ),
    ] {
        let (s, b) = call(
            &n.app,
            "POST",
            "/deployments",
            body,
            Some((&n.owner, n.owner_id)),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(b.contains(why), "{why}: {b}");
    }
    unchanged(&n, &[]);

    // A good deployment whose image is missing: refused with the reason, rolled back.
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&good).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b.contains("web") && b.contains("/nonexistent/image.flist") && b.contains("rolled back"),
        "{b}"
    );
    assert!(n.store.deployments(None).unwrap().is_empty());
    assert!(n.store.ops().unwrap().is_empty());
    // ...and the same document again (in a new request) is a replay of version 1.
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        serde_json::to_vec(&good).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b.contains("replayed"), "{b}");
}

#[tokio::test]
async fn only_the_owner_sees_its_deployment_and_logs() {
    let n = node();
    // A committed deployment (as if deployed earlier).
    let mut d = deployment(n.owner_id, 1);
    d.sign(n.owner_id, &n.owner);
    let op = n
        .store
        .begin_op(OpKind::Create, None, Some(&d), (n.owner_id, 7))
        .unwrap();
    n.store.end_op(op).unwrap();

    let (s, _) = call(
        &n.app,
        "GET",
        "/deployments/7",
        vec![],
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &n.app,
        "GET",
        "/deployments/7/vms/web/logs",
        vec![],
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for path in ["/deployments/7", "/deployments/7/vms/web/logs"] {
        let (s, b) = call(&n.app, "GET", path, vec![], Some((&n.other, n.other_id))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {b}");
        let (s, b) = call(&n.app, "GET", path, vec![], None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {b}");
        assert!(b.contains("operator"), "{b}");
    }
    let (s, b) = call(
        &n.app,
        "GET",
        "/deployments",
        vec![],
        Some((&n.other, n.other_id)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, "[]");
    // Another twin cannot delete it; the operator gets capacity and health.
    let (s, _) = call(
        &n.app,
        "DELETE",
        "/deployments/7",
        vec![],
        Some((&n.other, n.other_id)),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(n.store.deployments(None).unwrap().len(), 1);
    let (s, b) = call(&n.app, "GET", "/node", vec![], None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b.contains("capacity_used"), "{b}");
    // Same version again: a replay.
    let (s, b) = call(
        &n.app,
        "PUT",
        "/deployments/7",
        serde_json::to_vec(&d).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    // A replayed request (same signature headers) is refused.
    let path = "/deployments";
    let headers = auth::sign(
        &n.owner,
        &Signer::Twin(n.owner_id),
        "GET",
        path,
        b"",
        auth::now_unix(),
    );
    for expect in [StatusCode::OK, StatusCode::UNAUTHORIZED] {
        let mut req = Request::builder().method("GET").uri(path);
        for (h, v) in &headers {
            req = req.header(*h, v);
        }
        let resp = n
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), expect);
    }
}
