//! An exact copy of a signed request is a replay, also after a restart of the process that
//! saw it: the real agent binary (its API on the unix socket) and the real `registrar serve`
//! binary (on TCP) each get a request, are restarted, and refuse the same bytes again. No VM
//! is started.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{built, Node};
use node_agent::auth::{self, Signer};
use node_agent::identity::KeyPair;

/// Sends one HTTP/1.1 request with these headers, as bytes, and returns the status and body.
fn send(
    stream: &mut (impl Read + Write),
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (h, v) in headers {
        req.push_str(&format!("{h}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn unix(sock: &Path) -> std::os::unix::net::UnixStream {
    std::os::unix::net::UnixStream::connect(sock).unwrap()
}

#[test]
fn the_agent_refuses_a_replayed_request_after_a_restart() {
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let headers = auth::sign(
        &key,
        &Signer::Twin(twin),
        "GET",
        "/deployments",
        b"",
        auth::now_unix(),
    );
    let (status, body) = send(
        &mut unix(&node.sock()),
        "GET",
        "/deployments",
        &headers,
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &mut unix(&node.sock()),
        "GET",
        "/deployments",
        &headers,
        b"",
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("replayed"), "{body}");

    node.stop();
    node.start(None);
    let (status, body) = send(
        &mut unix(&node.sock()),
        "GET",
        "/deployments",
        &headers,
        b"",
    );
    assert_eq!(status, 401, "after a restart: {body}");
    assert!(body.contains("replayed"), "{body}");
    // A new request is still accepted.
    let fresh = auth::sign(
        &key,
        &Signer::Twin(twin),
        "GET",
        "/deployments",
        b"",
        auth::now_unix(),
    );
    let (status, body) = send(&mut unix(&node.sock()), "GET", "/deployments", &fresh, b"");
    assert_eq!(status, 200, "{body}");
}

/// `node-agent registrar serve` on a free loopback port.
struct Registrar {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Registrar {
    fn start(state: &Path, addr: std::net::SocketAddr) -> Self {
        let child = Command::new(built("node-agent"))
            .arg("registrar")
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("GRIDNODE_LOG", "warn")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the registrar never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, String) {
        send(
            &mut std::net::TcpStream::connect(self.addr).unwrap(),
            method,
            path,
            headers,
            body,
        )
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn registrar_serve_refuses_a_replayed_write_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let reg = Registrar::start(dir.path(), addr);
    let key = KeyPair::generate();
    let body = b"{}";
    let headers = auth::sign(
        &key,
        &Signer::Key(key.public()),
        "POST",
        "/twins",
        body,
        auth::now_unix(),
    );
    let (status, text) = reg.send("POST", "/twins", &headers, body);
    assert_eq!(status, 200, "{text}");
    let twin: node_agent::registrar::Twin = serde_json::from_str(&text).unwrap();
    let farm = br#"{"name":"farm-1"}"#;
    let headers = auth::sign(
        &key,
        &Signer::Twin(twin.id),
        "POST",
        "/farms",
        farm,
        auth::now_unix(),
    );
    let (status, text) = reg.send("POST", "/farms", &headers, farm);
    assert_eq!(status, 200, "{text}");

    drop(reg);
    let reg = Registrar::start(dir.path(), addr);
    let (status, text) = reg.send("POST", "/farms", &headers, farm);
    assert_eq!(status, 401, "after a restart: {text}");
    assert!(text.contains("replayed"), "{text}");
    // Its reads stay public.
    let (status, text) = reg.send("GET", &format!("/twins/{}", twin.id), &[], b"");
    assert_eq!(status, 200, "{text}");
}
