//! The control API, exit record and signal handling of the vmm binary, against the
//! freestanding test guest on this machine's own /dev/kvm: the `chatter` guest prints dots
//! forever, so its console log shows whether its vCPU runs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use common::{guest, kvm_available, openapi, vmm_bin};
use vm_spec::api::{ExitKind, ExitRecord, VmInfo, VmState};

/// A running vmm with the chatter guest and an API socket.
struct Vmm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vmm {
    fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn_with_env(dir.path(), extra, env);
        let vmm = Self { child, dir };
        vmm.wait_for_socket();
        vmm
    }

    fn spawn(dir: &Path, extra: &[&str]) -> Child {
        Self::spawn_with_env(dir, extra, &[])
    }

    fn spawn_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let kernel = guest("chatter");
        // Test faults exist only in the debug build cargo made for these tests.
        let bin = if env.iter().any(|(name, _)| *name == "VMM_TEST_FAULT") {
            PathBuf::from(env!("CARGO_BIN_EXE_vmm"))
        } else {
            vmm_bin()
        };
        Command::new(bin)
            .envs(env.iter().copied())
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
        let answer = self.request_full(method, path, body);
        (answer.status, answer.body)
    }

    fn request_full(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n");
        if let Some(body) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            raw.push_str("\r\n");
        }
        self.raw_full(raw.as_bytes())
    }

    fn raw(&self, bytes: &[u8]) -> (u16, String) {
        let answer = self.raw_full(bytes);
        (answer.status, answer.body)
    }

    fn raw_full(&self, bytes: &[u8]) -> Answer {
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

/// One HTTP answer.
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: String,
}

fn parse_response(answer: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let content_type = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_string())
    });
    Answer {
        status,
        content_type,
        body: body.to_string(),
    }
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

/// Sends `body` to `method concrete` (the route `pattern`), expects `want`, checks the answer
/// against the document (status documented for the route, media type, schema: required
/// fields, enums, no undocumented field) and notes the (route, status) seen. A body the
/// server accepts must be one the document allows.
fn documented_call(
    vm: &Vmm,
    doc: &openapi::Doc,
    seen: &mut BTreeSet<(String, String, u16)>,
    (method, pattern, concrete): (&str, &str, &str),
    body: Option<&str>,
    want: u16,
) -> String {
    let answer = vm.request_full(method, concrete, body);
    assert_eq!(
        answer.status, want,
        "{method} {concrete} {body:?}: {}",
        answer.body
    );
    doc.check_response(
        method,
        pattern,
        answer.status,
        answer.content_type.as_deref(),
        &answer.body,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    if let (Some(body), 200..=299) = (body, answer.status) {
        doc.check_request(method, pattern, body)
            .unwrap_or_else(|e| panic!("accepted, not documented: {e}"));
    }
    seen.insert((method.to_string(), pattern.to_string(), answer.status));
    answer.body
}

#[test]
fn every_documented_route_answers_as_documented() {
    if !kvm_available() {
        return;
    }
    let doc = openapi::Doc::load();
    // The document and the server list the same routes.
    let mut doc_routes: Vec<(String, String)> = doc
        .operations()
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let mut served: Vec<(String, String)> = vmm::api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    doc_routes.sort();
    served.sort();
    assert_eq!(doc_routes, served);
    assert_eq!(doc.check_request_examples(), Ok(2));

    // A drive (it has a rate limiter) and a share (it has none).
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("id=data,path={}", image.display());
    let share = format!("tag=share,dir={}", dir.path().display());
    let vm = Vmm::start(&["--drive", &drive, "--fs", &share, "--shutdown-grace", "0"]);
    vm.wait_until_running();
    let mut seen = BTreeSet::new();
    let mut call = |route: (&str, &str, &str), body: Option<&str>, want: u16| {
        documented_call(&vm, &doc, &mut seen, route, body, want)
    };
    let get_vm = ("GET", "/vm", "/vm");
    let actions = ("PUT", "/vm/actions", "/vm/actions");
    let patch = |id| ("PATCH", "/devices/{id}", id);

    let info: VmInfo = serde_json::from_str(&call(get_vm, None, 200)).unwrap();
    assert_eq!(info.state, VmState::Running);
    let ids: Vec<(&str, &str)> = info
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(ids, [("share", "fs"), ("data", "block")]);
    let metrics = call(("GET", "/metrics", "/metrics"), None, 200);
    assert!(metrics.contains("vmm_vcpu_exits_total{"), "{metrics}");

    // PATCH: the documented example on a drive, limits lifted, and every documented refusal.
    let limits = doc.request_example("PATCH", "/devices/{id}").unwrap();
    call(patch("/devices/data"), Some(&limits), 204);
    call(patch("/devices/data"), Some(r#"{"rate_limiter":{}}"#), 204);
    let refused = call(patch("/devices/share"), Some(&limits), 400);
    assert_eq!(
        error_of(&refused),
        "device \"share\": this device has no rate limiter"
    );
    let bad = r#"{"rate_limiter":{"ops":{"size":0,"refill_time_ms":1}}}"#;
    call(patch("/devices/data"), Some(bad), 400);
    call(
        patch("/devices/data"),
        Some(r#"{"rate_limiter":{},"x":1}"#),
        400,
    );
    let missing = call(patch("/devices/nope"), Some(&limits), 404);
    assert_eq!(error_of(&missing), "no device \"nope\"");

    // Actions: the documented example (pause), then each documented refusal.
    let pause = doc.request_example("PUT", "/vm/actions").unwrap();
    assert_eq!(pause, r#"{"action":"pause"}"#);
    call(actions, Some(&pause), 204);
    let info: VmInfo = serde_json::from_str(&call(get_vm, None, 200)).unwrap();
    assert_eq!(info.state, VmState::Paused);
    call(actions, Some(&pause), 409);
    call(actions, Some(r#"{"action":"resume"}"#), 204);
    call(actions, Some(r#"{"action":"resume"}"#), 409);
    call(actions, Some(r#"{"action":"reboot"}"#), 400);
    call(actions, None, 400);

    // Shutdown: accepted, the VM is exiting (no pause then), and it ends. The chatter guest
    // ignores Ctrl-Alt-Del: the vmm ends it after the grace period (0) and its margin.
    call(actions, Some(r#"{"action":"shutdown"}"#), 202);
    let info: VmInfo = serde_json::from_str(&call(get_vm, None, 200)).unwrap();
    assert_eq!(info.state, VmState::Exiting);
    let during = call(actions, Some(&pause), 409);
    assert_eq!(error_of(&during), "cannot pause the VM during a shutdown");
    let (status, stderr, record, _dir) = vm.wait();
    assert_eq!(status.code(), Some(137), "{stderr}");
    let record = record.expect("an exit record");
    assert_eq!(record.kind, ExitKind::Killed);
    assert!(
        record.reason.contains("did not shut down"),
        "{}",
        record.reason
    );

    // A pause whose vCPUs do not all park in time (a vCPU made to hang before it runs: a
    // debug build's test fault) answers 503.
    if cfg!(debug_assertions) {
        let hung = Vmm::start_with_env(&["--vcpus", "2"], &[("VMM_TEST_FAULT", "hang@vcpu1")]);
        let unparked = documented_call(&hung, &doc, &mut seen, actions, Some(&pause), 503);
        assert!(
            error_of(&unparked).starts_with("cannot pause: 1 of 2 vCPUs parked within"),
            "{unparked}"
        );
    }

    // Every documented answer was seen.
    for (method, path, _) in doc.operations() {
        for status in doc.statuses(&method, &path) {
            if status == 503 && !cfg!(debug_assertions) {
                continue;
            }
            assert!(
                seen.contains(&(method.clone(), path.clone(), status)),
                "{method} {path} {status} was never answered"
            );
        }
    }
}

#[test]
fn the_schema_checker_refuses_what_the_document_forbids() {
    let doc = openapi::Doc::load();
    let info = serde_json::json!({
        "state": "running", "uptime_ms": 5, "vcpus": 1, "memory_mib": 32,
        "devices": [{"id": "data", "kind": "block"}]
    });
    let schema: serde_yaml::Value =
        serde_yaml::from_str(r##"{$ref: "#/components/schemas/VmInfo"}"##).unwrap();
    doc.check(&schema, &info).unwrap();
    let broken = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut value = info.clone();
        edit(&mut value);
        doc.check(&schema, &value).unwrap_err()
    };
    let e = broken(&|v| {
        v.as_object_mut().unwrap().remove("vcpus");
    });
    assert!(e.contains("required field \"vcpus\""), "{e}");
    let e = broken(&|v| v["state"] = "sleeping".into());
    assert!(e.contains("$.state: \"sleeping\" is not one of"), "{e}");
    let e = broken(&|v| v["extra"] = 1.into());
    assert!(e.contains("field \"extra\" is not documented"), "{e}");
    let e = broken(&|v| v["devices"][0]["kind"] = "gpu".into());
    assert!(e.contains("$.devices[0].kind"), "{e}");
    let e = broken(&|v| v["uptime_ms"] = "5".into());
    assert!(e.contains("is not of type integer"), "{e}");
    let e = broken(&|v| v["booted_after_ms"] = serde_json::Value::Null);
    assert!(e.contains("$.booted_after_ms: null"), "{e}");
    // Responses: an undocumented status, a body where none is documented, a wrong media type.
    assert!(doc
        .check_response("GET", "/vm", 201, Some("application/json"), "{}")
        .is_err());
    assert!(doc
        .check_response("PUT", "/vm/actions", 204, None, "{}")
        .is_err());
    assert!(doc
        .check_response("GET", "/vm", 200, Some("text/plain"), &info.to_string())
        .is_err());
    assert!(doc
        .check_response(
            "PUT",
            "/vm/actions",
            409,
            Some("application/json"),
            r#"{"error":1}"#
        )
        .is_err());
    // A schema keyword the checker does not know is an error, not a pass.
    let strict = openapi::Doc::from_str("components: {schemas: {}}");
    let pattern: serde_yaml::Value = serde_yaml::from_str("{type: string, pattern: a}").unwrap();
    assert!(strict
        .check(&pattern, &"b".into())
        .unwrap_err()
        .contains("pattern"));
    // oneOf wants exactly one match.
    let one_of: serde_yaml::Value =
        serde_yaml::from_str("{oneOf: [{type: object}, {type: object}]}").unwrap();
    assert!(strict.check(&one_of, &serde_json::json!({})).is_err());
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
