//! `node-agent deploy` of a VM whose image is given by an `http://` URL (with its BLAKE3),
//! with the real agent binary and CLI and a real vmm running the `chatter` test guest on this
//! machine's /dev/kvm. The image is served from a local HTTP server that holds its answer for
//! a few seconds, as a slow image server would.
//!
//! On a terminal (the CLI run under `script`, which gives it a pseudo-terminal) the deploy
//! shows what the VM is doing while the image is fetched; in a pipe it prints no progress and
//! no terminal control codes. Either way the VM runs from the fetched image. The node's
//! Prometheus metrics then count the two VMs, their capacity and the two deploys.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::time::Duration;

use common::{built, running, vm_deployment, Node};
use e2e_tests::kvm_available;

/// Serves `body` once per connection after `delay`, `count` times; returns the URL.
fn slow_server(body: Vec<u8>, delay: Duration, count: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/root.flist", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for _ in 0..count {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            std::thread::sleep(delay);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let out = reader.get_mut();
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body);
        }
    });
    url
}

#[test]
fn deploy_shows_each_vms_step_on_a_terminal_while_its_image_is_fetched() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let key_file = node.dir.path().join("user.key");
    key.save_new(&key_file).unwrap();
    std::fs::write(node.dir.path().join("user.key.twin"), format!("{twin}\n")).unwrap();
    let image = std::fs::read(node.image()).unwrap();
    let hash = blake3::hash(&image).to_hex().to_string();
    // Two deployments, each with its own URL (an image is fetched once per URL).
    let url = slow_server(image.clone(), Duration::from_secs(3), 1);
    let url_piped = slow_server(image, Duration::from_secs(3), 1);

    let deploy_file = |id: u64, url: &str| {
        let mut d = vm_deployment(twin, 1, &node.image(), &["web"]);
        d.deployment_id = id;
        let vm = common::vm_mut(&mut d, "web");
        vm.image = url.to_string();
        vm.image_blake3 = Some(hash.clone());
        let file = node.dir.path().join(format!("d{id}.json"));
        std::fs::write(&file, serde_json::to_vec(&d).unwrap()).unwrap();
        file
    };
    let cli = built("node-agent");
    let deploy = format!(
        "{} deploy {} --key {} --agent {}",
        cli.display(),
        deploy_file(1, &url).display(),
        key_file.display(),
        node.sock().display()
    );

    // On a terminal.
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &deploy, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "deploy failed: {shown}");
    assert!(
        shown.contains("deploying 1 (version 1): web: fetching and checking its images"),
        "no progress of the image fetch on the terminal:\n{shown}"
    );
    assert!(shown.contains("started [\"web\"]"), "{shown}");

    // In a pipe: the outcome only.
    let out = Command::new(&cli)
        .arg("deploy")
        .arg(deploy_file(2, &url_piped))
        .arg("--key")
        .arg(&key_file)
        .arg("--agent")
        .arg(node.sock())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy failed: {stdout}{stderr}");
    assert!(stdout.contains("started [\"web\"]"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains("fetching") && !text.contains('\u{1b}'),
            "progress or control codes in a pipe: {text:?}"
        );
    }

    // Both VMs run from the fetched images, kept once per URL under images/.
    for id in [1, 2] {
        let r = node.call(&key, twin, "GET", &format!("/deployments/{id}"), None);
        let s: node_agent::api::DeploymentStatus = r.json().unwrap();
        assert!(running(&s, &["web"]), "deployment {id}: {:?}", s.vms);
        assert!(
            s.steps.is_empty(),
            "steps left after the change: {:?}",
            s.steps
        );
    }
    let kept = std::fs::read_dir(node.state().join("images"))
        .unwrap()
        .count();
    assert_eq!(kept, 2);

    // The operator's metrics (unsigned, on the unix socket) after the two deploys: workloads
    // by state, capacity used and total, registration and uptime reports, deploy latency.
    let want = [
        "gridnode_workloads{state=\"running\"} 2".to_string(),
        format!(
            "gridnode_capacity{{resource=\"mru\",kind=\"used\"}} {}",
            2 * (64u64 << 20)
        ),
        "gridnode_capacity{resource=\"mru\",kind=\"total\"} ".into(),
        "gridnode_capacity{resource=\"cru\",kind=\"used\"} 2".into(),
        "gridnode_registered 1".into(),
        "gridnode_uptime_reports_sent_total ".into(),
        "gridnode_deploy_seconds_bucket{le=\"+Inf\"} 2".into(),
        "gridnode_deploy_seconds_count 2".into(),
    ];
    let operator = node_agent::client::Client::new(node_agent::client::Endpoint::Unix(node.sock()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = common::block_on(operator.request("GET", "/metrics", None))
            .unwrap()
            .text();
        let missing: Vec<&String> = want.iter().filter(|w| !text.contains(w.as_str())).collect();
        if missing.is_empty() {
            break;
        }
        // Registration runs beside the deploys; everything else is final.
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in /metrics:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
