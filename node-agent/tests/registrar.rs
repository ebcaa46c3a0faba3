//! The embedded registrar served over real HTTP (TCP on loopback) and used through the remote
//! client, as several nodes on one machine would: signed writes, public reads, refusals of
//! unsigned, wrongly signed and replayed writes, and uptime reports that are kept while the
//! registrar is down and sent when it is back.

use std::sync::Arc;

use node_agent::auth::{self, ReplayGuard, Signer};
use node_agent::capacity::Resources;
use node_agent::client::{Client, Endpoint};
use node_agent::config::{AgentConfig, Location};
use node_agent::identity::KeyPair;
use node_agent::metrics::Metrics;
use node_agent::registrar::local::LocalRegistrar;
use node_agent::registrar::remote::RemoteRegistrar;
use node_agent::registrar::{server, NodeInfo, Registrar, RegistrarError, UptimeReport};
use node_agent::state::Store;
use node_agent::uptime::Registration;

async fn serve(dir: &std::path::Path, addr: &str) -> (String, tokio::task::JoinHandle<()>) {
    let store = Arc::new(Store::open(&dir.join("registrar.db")).unwrap());
    let state = Arc::new(server::ServerState {
        registrar: LocalRegistrar::new(store),
        replays: ReplayGuard::default(),
    });
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, server::router(state)).await.unwrap();
    });
    (url, task)
}

fn info(farm_id: u32) -> NodeInfo {
    NodeInfo {
        farm_id,
        capacity: Resources {
            cru: 2,
            mru: 1 << 30,
            sru: 10 << 30,
            hru: 0,
        },
        location: Location {
            country: "BE".into(),
            city: "Ghent".into(),
            ..Default::default()
        },
        interfaces: vec![],
        serial_number: "s1".into(),
        virtualized: true,
        secure_boot: false,
    }
}

#[tokio::test]
async fn nodes_register_with_one_registrar_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _task) = serve(dir.path(), "127.0.0.1:0").await;
    let reg = RemoteRegistrar::new(&url).unwrap();
    let farmer = KeyPair::generate();
    let farmer_twin = reg.create_twin(&farmer).await.unwrap();
    // Idempotent: the same key is the same twin.
    assert_eq!(reg.create_twin(&farmer).await.unwrap(), farmer_twin);
    let farm = reg
        .create_farm(&farmer, farmer_twin.id, "farm-a")
        .await
        .unwrap();

    let mut node_ids = Vec::new();
    for _ in 0..2 {
        let node_key = KeyPair::generate();
        let twin = reg.create_twin(&node_key).await.unwrap();
        let node = reg
            .register_node(&node_key, twin.id, &info(farm.id))
            .await
            .unwrap();
        // Re-registration updates the same node.
        let mut changed = info(farm.id);
        changed.capacity.cru = 4;
        let again = reg
            .register_node(&node_key, twin.id, &changed)
            .await
            .unwrap();
        assert_eq!(again.id, node.id);
        assert_eq!(
            reg.node_by_twin(twin.id)
                .await
                .unwrap()
                .unwrap()
                .info
                .capacity
                .cru,
            4
        );
        reg.report_uptime(
            &node_key,
            twin.id,
            node.id,
            &UptimeReport {
                uptime: 100,
                timestamp: auth::now_unix(),
            },
        )
        .await
        .unwrap();
        // Another twin cannot report for this node.
        let err = reg
            .report_uptime(
                &farmer,
                farmer_twin.id,
                node.id,
                &UptimeReport {
                    uptime: 1,
                    timestamp: 0,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RegistrarError::Refused(_)), "{err}");
        node_ids.push(node.id);
    }
    assert_ne!(node_ids[0], node_ids[1]);
    // Unknown farm.
    let k = KeyPair::generate();
    let t = reg.create_twin(&k).await.unwrap();
    let err = reg.register_node(&k, t.id, &info(999)).await.unwrap_err();
    assert!(matches!(err, RegistrarError::UnknownFarm(999)), "{err}");
}

#[tokio::test]
async fn writes_must_be_signed_by_the_right_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _task) = serve(dir.path(), "127.0.0.1:0").await;
    let endpoint = Endpoint::parse(&url).unwrap();
    let key = KeyPair::generate();
    let body = br#"{"name":"f"}"#.to_vec();
    // Unsigned.
    let resp = Client::new(endpoint.clone())
        .request("POST", "/farms", Some(body.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status, 401, "{}", resp.text());
    // Signed by a key that is not the twin's.
    let reg = RemoteRegistrar::new(&url).unwrap();
    let twin = reg.create_twin(&key).await.unwrap();
    let intruder = KeyPair::generate();
    let resp = Client::new(endpoint.clone())
        .signed(intruder, Signer::Twin(twin.id))
        .request("POST", "/farms", Some(body.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert!(resp.error_message().contains("signature"));
    // Replayed: the same signed request twice.
    let headers = auth::sign(
        &key,
        &Signer::Twin(twin.id),
        "POST",
        "/farms",
        &body,
        auth::now_unix(),
    );
    let send = || async {
        let stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri("/farms")
            .header("host", "x");
        for (h, v) in &headers {
            req = req.header(*h, v);
        }
        let req = req
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.clone(),
            )))
            .unwrap();
        tx.send_request(req).await.unwrap().status().as_u16()
    };
    assert_eq!(send().await, 200);
    assert_eq!(send().await, 401);
}

#[tokio::test]
async fn uptime_reports_wait_for_a_registrar_that_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join("registrar");
    std::fs::create_dir(&reg_dir).unwrap();
    // Reserve a port, then let the registrar be down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");

    let store = Arc::new(Store::open(&dir.path().join("agent.db")).unwrap());
    let config = AgentConfig {
        registrar: url.clone(),
        uptime_interval_secs: 1,
        farm_id: 1,
        ..Default::default()
    };
    let key = KeyPair::generate();
    let metrics = Arc::new(Metrics::default());
    let registration = Registration {
        config,
        key: key.clone(),
        registrar: Arc::new(RemoteRegistrar::new(&url).unwrap()),
        store: store.clone(),
        metrics: metrics.clone(),
        capacity: Resources {
            cru: 1,
            mru: 1 << 30,
            sru: 0,
            hru: 0,
        },
    };
    let run = tokio::spawn(registration.run());
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        metrics
            .registered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(
        metrics
            .registration_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // The registrar comes up, with the farm the node is configured for.
    let (_, _task) = serve(&reg_dir, &addr).await;
    let reg = RemoteRegistrar::new(&url).unwrap();
    let farmer = KeyPair::generate();
    let ft = reg.create_twin(&farmer).await.unwrap();
    reg.create_farm(&farmer, ft.id, "farm-1").await.unwrap();
    let mut node = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Some(t) = reg.twin_by_key(&key.public()).await.unwrap() {
            if let Some(n) = reg.node_by_twin(t.id).await.unwrap() {
                node = Some(n);
                if metrics
                    .uptime_reports_sent
                    .load(std::sync::atomic::Ordering::Relaxed)
                    >= 1
                {
                    break;
                }
            }
        }
    }
    let node = node.expect("the node registered once the registrar was up");
    assert!(
        metrics
            .uptime_reports_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let resp = Client::new(Endpoint::parse(&url).unwrap())
        .request("GET", &format!("/nodes/{}/uptime", node.id), None)
        .await
        .unwrap();
    let reports: Vec<UptimeReport> = resp.json().unwrap();
    assert!(!reports.is_empty());
    // The host's uptime, not the agent's.
    assert!(
        reports[0].uptime
            >= node_agent::uptime::host_uptime()
                .unwrap()
                .saturating_sub(60)
    );
    run.abort();
}
