//! The agent's API in-process (router, SQLite state, embedded registrar; no VM is started):
//! the OpenAPI document lists exactly the routes served and each answers; on TCP every
//! request must carry a valid signature; forged, replayed, unsigned, over-capacity and
//! malformed deployments, a twin acting for another, and the operator asking for workload
//! data are refused with their reason and change nothing; a deployment that asks for
//! co-signers is accepted only with enough of their signatures, added with `node-agent sign`.

mod common;

use std::sync::Arc;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use node_agent::api::{self, ApiDoc, ApiState};
use node_agent::auth::{self, ReplayGuard, Signer};
use node_agent::capacity::Resources;
use node_agent::client::{Client, Endpoint};
use node_agent::config::AgentConfig;
use node_agent::deployment::{Deployment, FailurePolicy, Workload};
use node_agent::engine::Engine;
use node_agent::identity::KeyPair;
use node_agent::metrics::Metrics;
use node_agent::registrar::local::LocalRegistrar;
use node_agent::registrar::server::ServerState;
use node_agent::state::{OpKind, Store};
use tower::ServiceExt;
use utoipa::OpenApi;

struct Node {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    store: Arc<Store>,
    /// What the agent serves on its unix socket (its routes and the embedded registrar).
    app: axum::Router,
    /// The same on TCP.
    tcp: axum::Router,
    /// The (method, path) of every route `app` serves.
    served: Vec<(String, String)>,
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
    let registrar = || {
        Some(Arc::new(ServerState {
            registrar: LocalRegistrar::new(store.clone()),
            replays: ReplayGuard::default(),
        }))
    };
    let routes = api::app(state.clone(), false, registrar());
    let served = routes
        .served()
        .iter()
        .map(|(m, p)| (m.to_string(), p.clone()))
        .collect();
    let app = routes.into_router();
    let tcp = api::app(state, true, registrar()).into_router();
    Node {
        _dir: dir,
        state_dir,
        store,
        app,
        tcp,
        served,
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

/// Every (method, path) the OpenAPI document describes.
fn documented() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in &ApiDoc::openapi().paths.paths {
        for (m, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
            ("HEAD", &item.head),
            ("OPTIONS", &item.options),
            ("TRACE", &item.trace),
        ] {
            if op.is_some() {
                out.insert((m.to_string(), path.clone()));
            }
        }
    }
    out
}

/// The document and the router agree both ways: a route served but not documented (or
/// documented but not served) fails here, the embedded registrar's under `/registrar` too.
#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes_served() {
    let n = node();
    let served: BTreeSet<(String, String)> = n.served.iter().cloned().collect();
    assert_eq!(served.len(), n.served.len(), "a route is added twice");
    let documented = documented();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served, not in the OpenAPI document: {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "in the OpenAPI document, not served: {unserved:?}"
    );
    for route in [
        ("POST", "/deployments"),
        ("GET", "/registrar/twins/{id}"),
        ("POST", "/registrar/nodes/{id}/uptime"),
    ] {
        assert!(
            served.contains(&(route.0.to_string(), route.1.to_string())),
            "{route:?} is not served"
        );
    }
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
                !body.contains("no such route"),
                "{m} {path} is documented but not routed: {status} {body}"
            );
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
        }
    }
    assert!(count >= 8, "only {count} documented operations");
    for path in ["/nope", "/registrar/nope", "/deployments/7/nope"] {
        let (status, body) = call(&n.app, "GET", path, vec![], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(body.contains("no such route"), "{path}: {body}");
    }
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

/// On TCP every request of the agent's API must carry a valid signature of a twin: unsigned,
/// garbled, signed by another key than the twin's, or signed for another request, each is
/// refused with 401 and its reason, on every route. The embedded registrar there serves its
/// public reads and twin creation only. Over a real TCP socket too.
#[tokio::test]
async fn on_tcp_every_request_is_signed() {
    let n = node();
    let raw = |method: &str, path: &str, headers: &[(&str, String)]| {
        let mut req = Request::builder().method(method).uri(path);
        for (h, v) in headers {
            req = req.header(*h, v);
        }
        let app = n.tcp.clone();
        let req = req.body(Body::from(b"{}".to_vec())).unwrap();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let mut checked = 0;
    for (m, path) in &n.served {
        if path.starts_with("/registrar/") {
            continue;
        }
        let path = path.replace("{id}", "7").replace("{name}", "web");
        let (s, b) = call(&n.tcp, m, &path, b"{}".to_vec(), None).await;
        let b: String = b.chars().take(300).collect();
        assert_eq!(s, StatusCode::UNAUTHORIZED, "unsigned {m} {path}: {b}");
        assert!(b.contains("not signed"), "{m} {path}: {b}");
        let (s, b) = call(
            &n.tcp,
            m,
            &path,
            b"{}".to_vec(),
            Some((&n.other, n.owner_id)),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{m} {path} signed by another key: {b}"
        );
        assert!(b.contains("signature does not match"), "{m} {path}: {b}");
        // A valid signature of another request (another path).
        let headers = auth::sign(
            &n.owner,
            &Signer::Twin(n.owner_id),
            m,
            "/node",
            b"{}",
            auth::now_unix(),
        );
        if path != "/node" {
            let (s, b) = raw(m, &path, &headers).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{m} {path} signed for /node: {b}"
            );
        }
        let garbled = [
            (auth::H_SIGNER, format!("twin:{}", n.owner_id)),
            (auth::H_TIMESTAMP, auth::now_unix().to_string()),
            (auth::H_NONCE, "00".into()),
            (auth::H_SIGNATURE, "zz".into()),
        ];
        let (s, b) = raw(m, &path, &garbled).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {path} garbled: {b}");
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} routes checked");
    // Signed by the twin: answered.
    let (s, b) = call(&n.tcp, "GET", "/node", vec![], Some((&n.owner, n.owner_id))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = call(
        &n.tcp,
        "GET",
        "/deployments",
        vec![],
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The registrar: public reads; writes other than a twin's creation refused.
    let (s, b) = call(
        &n.tcp,
        "GET",
        &format!("/registrar/twins/{}", n.owner_id),
        vec![],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = call(
        &n.tcp,
        "POST",
        "/registrar/farms",
        br#"{"name":"f"}"#.to_vec(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = call(&n.tcp, "POST", "/registrar/twins", b"{}".to_vec(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    // The same over a real TCP socket, with the agent's client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = n.tcp.clone();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let endpoint = Endpoint::Tcp(addr.to_string());
    let resp = Client::new(endpoint.clone())
        .request("GET", "/deployments", None)
        .await
        .unwrap();
    assert_eq!(resp.status, 401, "{}", resp.text());
    let resp = Client::new(endpoint.clone())
        .signed(n.other.clone(), Signer::Twin(n.owner_id))
        .request("GET", "/deployments", None)
        .await
        .unwrap();
    assert_eq!(resp.status, 401, "{}", resp.text());
    let resp = Client::new(endpoint)
        .signed(n.owner.clone(), Signer::Twin(n.owner_id))
        .request("GET", "/deployments", None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    server.abort();
}

/// A deployment that asks for 2 of 3 co-signers (besides its owner): co-signers add their
/// signatures to the file with `node-agent sign`; with one of them it is refused, with two
/// accepted; an update that drops the requirement still needs the previous version's quorum.
#[tokio::test]
async fn a_multisig_deployment_needs_its_quorum_of_co_signers() {
    use node_agent::deployment::{SignatureRequest, SignatureRequirement};
    let n = node();
    let dir = tempfile::tempdir().unwrap();
    let registrar = LocalRegistrar::new(n.store.clone());
    let mut signers = Vec::new();
    for i in 0..3 {
        let key = KeyPair::generate();
        let id = registrar.add_twin(&key.public()).unwrap().id;
        let path = dir.path().join(format!("cosigner{i}.key"));
        key.save_new(&path).unwrap();
        std::fs::write(
            dir.path().join(format!("cosigner{i}.key.twin")),
            format!("{id}\n"),
        )
        .unwrap();
        signers.push((path, id));
    }
    let mut d = common::unbootable_deployment(n.owner_id, 7, 1, "", FailurePolicy::Keep);
    d.signature_requirement = Some(SignatureRequirement {
        requests: signers
            .iter()
            .map(|(_, id)| SignatureRequest {
                twin_id: *id,
                weight: 1,
            })
            .collect(),
        weight_required: 2,
    });
    let file = dir.path().join("deployment.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&d).unwrap()).unwrap();

    let sign = |key: &std::path::Path, twin: Option<u32>| {
        let mut cmd = std::process::Command::new(common::built("node-agent"));
        cmd.arg("sign").arg(&file).arg("--key").arg(key);
        if let Some(t) = twin {
            cmd.arg("--twin").arg(t.to_string());
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // The owner's submission: `deploy` adds the owner's signature to what the file holds.
    let submit = || {
        let mut doc: Deployment = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        doc.sign(n.owner_id, &n.owner);
        serde_json::to_vec(&doc).unwrap()
    };

    // A twin that is not asked to sign cannot add itself.
    let other_key = dir.path().join("other.key");
    n.other.save_new(&other_key).unwrap();
    let (ok, out) = sign(&other_key, Some(n.other_id));
    assert!(!ok, "{out}");
    assert!(out.contains("neither the owner"), "{out}");

    // One co-signer of the two needed.
    let (ok, out) = sign(&signers[0].0, None);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("signed by twin {}", signers[0].1)),
        "{out}"
    );
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        submit(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(
        b.contains("signatures weigh 1") && b.contains("needs 2"),
        "{b}"
    );
    unchanged(&n, &[]);

    // A second co-signer: accepted.
    let (ok, out) = sign(&signers[2].0, None);
    assert!(ok, "{out}");
    let body = submit();
    let (s, b) = call(
        &n.app,
        "POST",
        "/deployments",
        body.clone(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let stored = n.store.deployments(Some(n.owner_id)).unwrap();
    assert_eq!(stored.len(), 1);
    let valid: BTreeSet<u32> = stored[0].signatures.iter().map(|s| s.twin_id).collect();
    assert_eq!(
        valid,
        BTreeSet::from([n.owner_id, signers[0].1, signers[2].1])
    );

    // An update by the owner alone that drops the co-signers: refused.
    let mut next = common::unbootable_deployment(n.owner_id, 7, 2, "", FailurePolicy::Keep);
    next.sign(n.owner_id, &n.owner);
    let (s, b) = call(
        &n.app,
        "PUT",
        "/deployments/7",
        serde_json::to_vec(&next).unwrap(),
        Some((&n.owner, n.owner_id)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("previous version"), "{b}");
    assert_eq!(n.store.deployments(None).unwrap()[0].version, 1);
}
