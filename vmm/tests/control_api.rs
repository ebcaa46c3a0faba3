//! The control API, exit record and signal handling of the vmm binary, against the
//! freestanding test guest on this machine's own /dev/kvm: the `chatter` guest prints dots
//! forever, so its console log shows whether its vCPU runs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{guest, kvm_available, vmm_bin};
use vm_spec::api::{ExitKind, ExitRecord, VmInfo, VmState};

/// A running vmm with the chatter guest and an API socket.
struct Vmm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vmm {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn(dir.path(), extra);
        let vmm = Self { child, dir };
        vmm.wait_for_socket();
        vmm
    }

    fn spawn(dir: &Path, extra: &[&str]) -> Child {
        let kernel = guest("chatter");
        Command::new(vmm_bin())
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
            .arg("--serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("--api-sock")
            .arg(dir.join("api.sock"))
            .arg("--exit-record")
            .arg(dir.join("exit.json"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the API socket never answered");
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n");
        if let Some(body) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            raw.push_str("\r\n");
        }
        self.raw(raw.as_bytes())
    }

    fn raw(&self, bytes: &[u8]) -> (u16, String) {
        let mut stream = UnixStream::connect(self.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may answer and close before taking all of an oversized request.
        let _ = stream.write_all(bytes);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        parse_response(&answer)
    }

    fn info(&self) -> VmInfo {
        let (status, body) = self.request("GET", "/vm", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn wait_until_running(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.info().state != VmState::Running {
            assert!(Instant::now() < deadline, "the guest never booted");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn console_len(&self) -> u64 {
        std::fs::metadata(self.dir.path().join("console.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Whether the guest's console grows within a second.
    fn guest_runs(&self) -> bool {
        let before = self.console_len();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            if self.console_len() > before {
                return true;
            }
        }
        false
    }

    fn metric(&self, name: &str) -> u64 {
        let (status, text) = self.request("GET", "/metrics", None);
        assert_eq!(status, 200);
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn wait(mut self) -> (ExitStatus, String, Option<ExitRecord>, tempfile::TempDir) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the vmm did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let record = std::fs::read(self.dir.path().join("exit.json"))
            .ok()
            .map(|bytes| serde_json::from_slice(&bytes).unwrap());
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status, stderr, record, dir)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_response(answer: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, body.to_string())
}

fn error_of(body: &str) -> String {
    let error: vm_spec::api::ApiError =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON error ({e}): {body}"));
    error.error
}

#[test]
fn pause_parks_the_vcpus_and_resume_lets_them_run() {
    if !kvm_available() {
        return;
    }
    let vm = Vmm::start(&["--vcpus", "2"]);
    vm.wait_until_running();
    let info = vm.info();
    assert_eq!((info.vcpus, info.memory_mib), (2, 32));
    assert!(info.booted_after_ms.is_some());
    assert!(vm.guest_runs());

    let (status, body) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"pause"}"#));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vm.info().state, VmState::Paused);
    let serial = vm.metric("vmm_serial_bytes_total");
    // What the guest wrote before the pause reaches the file a little later.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vm.guest_runs(), "the console grew while paused");
    assert_eq!(vm.metric("vmm_serial_bytes_total"), serial);
    let (status, body) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"pause"}"#));
    assert_eq!(status, 409);
    assert_eq!(error_of(&body), "cannot pause: the VM is already paused");

    let (status, _) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"resume"}"#));
    assert_eq!(status, 204);
    assert!(vm.guest_runs(), "the console did not grow after resume");
    assert!(vm.metric("vmm_serial_bytes_total") > serial);
    let (status, body) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"resume"}"#));
    assert_eq!(status, 409);
    assert_eq!(error_of(&body), "cannot resume: the VM is not paused");

    // Paused again, then killed: a paused VM ends too.
    let (status, _) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"pause"}"#));
    assert_eq!(status, 204);
    let (status, _) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"kill"}"#));
    assert_eq!(status, 204);
    let (status, stderr, record, dir) = vm.wait();
    assert_eq!(status.code(), Some(137), "{stderr}");
    let record = record.expect("an exit record");
    assert_eq!(record.kind, ExitKind::Killed);
    assert_eq!(record.status, 137);
    assert_eq!(record.reason, "killed through the control API");
    assert!(
        !dir.path().join("api.sock").exists(),
        "the socket is removed"
    );
}

#[test]
fn bad_requests_get_a_json_4xx_and_the_guest_never_notices() {
    if !kvm_available() {
        return;
    }
    let vm = Vmm::start(&[]);
    vm.wait_until_running();
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/nowhere", None, 404, "no route GET /nowhere"),
        (
            "DELETE",
            "/vm",
            None,
            405,
            "DELETE is not allowed on /vm; use GET",
        ),
        (
            "PUT",
            "/vm/actions",
            None,
            400,
            "the request needs a JSON body",
        ),
        ("PUT", "/vm/actions", Some("{"), 400, "invalid request body"),
        (
            "PUT",
            "/vm/actions",
            Some(r#"{"action":"reboot"}"#),
            400,
            "unknown variant `reboot`",
        ),
        (
            "PUT",
            "/vm/actions",
            Some(r#"{"action":"kill","now":1}"#),
            400,
            "unknown field `now`",
        ),
        (
            "PATCH",
            "/devices/nope",
            Some(r#"{"rate_limiter":{}}"#),
            404,
            "no device \"nope\"",
        ),
        (
            "PATCH",
            "/devices/nope",
            Some(r#"{"rate_limiter":{"ops":{"size":0,"refill_time_ms":1}}}"#),
            400,
            "invalid rate limiter: ops bucket: size must be 1",
        ),
    ];
    for (method, path, body, want, message) in cases {
        let (status, answer) = vm.request(method, path, *body);
        assert_eq!(status, *want, "{method} {path}: {answer}");
        assert!(
            error_of(&answer).contains(message),
            "{method} {path}: {answer}"
        );
    }
    // Oversized and malformed requests.
    let huge = format!(
        "PUT /vm/actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    assert_eq!(vm.raw(huge.as_bytes()).0, 413);
    assert_eq!(vm.raw(b"\x00\x01\x02 garbage\r\n\r\n").0, 400);
    let mut long_head = b"GET /vm HTTP/1.1\r\n".to_vec();
    long_head.resize(20_000, b'a');
    assert_eq!(vm.raw(&long_head).0, 431);
    // A client that connects and says nothing holds the API only for its timeout.
    let silent = UnixStream::connect(vm.socket()).unwrap();
    let started = Instant::now();
    assert_eq!(vm.info().state, VmState::Running);
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(silent);
    // Many requests on one connection (keep-alive), pipelined.
    let mut stream = UnixStream::connect(vm.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let many =
        "GET /vm HTTP/1.1\r\n\r\n".repeat(20) + "GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n";
    stream.write_all(many.as_bytes()).unwrap();
    let mut answers = String::new();
    stream.read_to_string(&mut answers).unwrap();
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 21);

    assert!(vm.guest_runs(), "the guest stopped");
    assert!(vm.child.stderr.is_some());
    let (status, _) = vm.request("PUT", "/vm/actions", Some(r#"{"action":"kill"}"#));
    assert_eq!(status, 204);
    let (status, _, _, _) = vm.wait();
    assert_eq!(status.code(), Some(137));
}

#[test]
fn every_documented_route_answers_as_documented() {
    if !kvm_available() {
        return;
    }
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&doc_path).unwrap()).unwrap();
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut documented = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_mapping().unwrap() {
            documented.push((
                method.as_str().unwrap().to_uppercase(),
                path.as_str().unwrap().to_string(),
                op.clone(),
            ));
        }
    }
    // The document and the server list the same routes.
    let mut doc_routes: Vec<(String, String)> = documented
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    let mut served: Vec<(String, String)> = vmm::api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    doc_routes.sort();
    served.sort();
    assert_eq!(doc_routes, served);

    let share = tempfile::tempdir().unwrap();
    let fs_arg = format!("tag=data,dir={}", share.path().display());
    let vm = Vmm::start(&["--fs", &fs_arg]);
    vm.wait_until_running();
    assert_eq!(vm.info().devices.len(), 1);
    for (method, path, op) in &documented {
        let concrete = path.replace("{id}", "data");
        let example = &op["requestBody"]["content"]["application/json"]["example"];
        let body = (!example.is_null()).then(|| serde_json::to_string(example).unwrap());
        let (status, answer) = vm.request(method, &concrete, body.as_deref());
        let responses = op["responses"].as_mapping().unwrap();
        let entry = responses
            .get(serde_yaml::Value::String(status.to_string()))
            .unwrap_or_else(|| {
                panic!("{method} {path} answered {status} ({answer}), not documented")
            });
        let content = &entry["content"];
        if !content["application/json"].is_null() {
            let value: serde_json::Value = serde_json::from_str(&answer).unwrap();
            assert!(value.is_object(), "{method} {path}: {answer}");
            if status >= 400 {
                error_of(&answer);
            }
        } else if !content["text/plain"].is_null() {
            assert!(answer.contains("vmm_vcpu_exits_total"), "{answer}");
        } else {
            assert!(
                answer.is_empty(),
                "{method} {path}: unexpected body {answer}"
            );
        }
    }
}

#[test]
fn sigterm_asks_the_guest_and_ends_a_guest_that_does_not_stop() {
    if !kvm_available() {
        return;
    }
    let vm = Vmm::start(&["--shutdown-grace", "0"]);
    vm.wait_until_running();
    let asked = Instant::now();
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(
        unsafe { libc::kill(vm.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.info().state != VmState::Exiting {
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not start a shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The chatter guest ignores Ctrl-Alt-Del: the VM ends after grace (0) + margin (5 s).
    let (status, stderr, record, _dir) = vm.wait();
    assert!(asked.elapsed() >= vmm::control::SHUTDOWN_MARGIN);
    assert_eq!(status.code(), Some(137), "{stderr}");
    let record = record.expect("an exit record");
    assert_eq!(record.kind, ExitKind::Killed);
    assert!(
        record.reason.contains("did not shut down within 5s"),
        "{}",
        record.reason
    );
}

#[test]
fn the_exit_record_tells_every_end_and_a_killed_vmm_leaves_nothing_in_the_way() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let record_path = dir.path().join("exit.json");
    let read_record =
        || -> ExitRecord { serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap() };
    let run = |kernel: &Path| {
        Command::new(vmm_bin())
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
            .args(["--serial", "off"])
            .arg("--exit-record")
            .arg(&record_path)
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .output()
            .unwrap()
    };
    let out = run(&guest("exit42"));
    assert_eq!(out.status.code(), Some(42));
    let record = read_record();
    assert_eq!(
        (record.status, record.kind),
        (42, ExitKind::GuestStatus),
        "{record:?}"
    );
    assert_eq!(record.reason, "the guest exited with status 42");
    assert!(record.at.ends_with('Z') && record.at_unix_ms > 0);

    let out = run(&guest("triplefault"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(read_record().kind, ExitKind::GuestFault);

    let out = run(Path::new("/nonexistent/kernel"));
    assert_eq!(out.status.code(), Some(2));
    let record = read_record();
    assert_eq!((record.status, record.kind), (2, ExitKind::StartFailed));
    assert!(
        record.reason.contains("/nonexistent/kernel"),
        "{}",
        record.reason
    );

    // SIGKILL leaves a socket and a stale record; the next start replaces both.
    let vm = Vmm::start(&[]);
    let socket = vm.socket();
    std::fs::write(vm.dir.path().join("exit.json"), b"stale").unwrap();
    let mut vm = vm;
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    assert!(socket.exists(), "a killed vmm cannot remove its socket");
    let child = Vmm::spawn(vm.dir.path(), &[]);
    let restarted = Vmm {
        child,
        dir: std::mem::replace(&mut vm.dir, tempfile::tempdir().unwrap()),
    };
    restarted.wait_for_socket();
    restarted.wait_until_running();
    assert!(
        !restarted.dir.path().join("exit.json").exists(),
        "the stale record is removed at start"
    );
    drop(restarted);

    // Something else than a socket at the API path is never replaced.
    let not_a_socket = dir.path().join("file");
    std::fs::write(&not_a_socket, b"keep me").unwrap();
    let out = Command::new(vmm_bin())
        .args([
            "--kernel",
            guest("exit0").to_str().unwrap(),
            "--memory",
            "32",
        ])
        .arg("--api-sock")
        .arg(&not_a_socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");
}

#[test]
fn drives_and_the_rng_take_new_rate_limits_and_report_their_counters() {
    if !kvm_available() {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("data.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("id=data,path={}", image.display());
    let vm = Vmm::start(&["--drive", &drive, "--rng"]);
    vm.wait_until_running();
    let limits = r#"{"rate_limiter":{"bandwidth":{"size":1048576,"refill_time_ms":100},"ops":{"size":100,"refill_time_ms":1000,"one_time_burst":50}}}"#;
    for id in ["data", "rng"] {
        let (status, answer) = vm.request("PATCH", &format!("/devices/{id}"), Some(limits));
        assert_eq!(status, 204, "{id}: {answer}");
        let (status, answer) = vm.request(
            "PATCH",
            &format!("/devices/{id}"),
            Some(r#"{"rate_limiter":{}}"#),
        );
        assert_eq!(status, 204, "{id}: limits lifted: {answer}");
    }
    let (status, text) = vm.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    for id in ["data", "rng"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("vmm_virtio_throttled_total{")
                    && l.contains(&format!("device=\"{id}\""))),
            "no counters for {id}:\n{text}"
        );
    }
    assert!(vm.guest_runs(), "the guest never noticed");
}
