//! The node image (scripts/node-image.sh) booted under QEMU like the test bed (TCG with
//! nested SVM, so the node has a real /dev/kvm), with a raw state disk on virtio-blk and user
//! networking that forwards a local port to the agent's TCP API. Unlike a test bed job, the
//! node keeps running while the test talks to it; its console is captured as it streams.
//! [`AgentCli`] drives the node from outside with the `node-agent` CLI, as a user would.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::artifacts;
use crate::error::{Error, Result};
use crate::qemu;

/// The node's static address on QEMU's user network, and the agent's port.
pub const NODE_IP: &str = "10.0.2.15";
pub const AGENT_PORT: u16 = 7070;

/// A built node image.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl NodeImage {
    /// `NODE_IMAGE_DIR` when set (a prebuilt image), else runs scripts/node-image.sh into
    /// `<target>/node-image` (release builds, guest kernel and init cached).
    pub fn build() -> Result<Self> {
        let dir = match std::env::var_os("NODE_IMAGE_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let dir = artifacts::target_dir().join("node-image");
                let script = artifacts::workspace_root().join("scripts/node-image.sh");
                let status = Command::new("bash")
                    .arg(&script)
                    .arg(&dir)
                    .env("CARGO_TARGET_DIR", artifacts::target_dir())
                    .stdout(Stdio::null())
                    .status()
                    .map_err(Error::io(format!("running {}", script.display())))?;
                if !status.success() {
                    return Err(Error::Invalid(format!(
                        "{} failed ({status})",
                        script.display()
                    )));
                }
                dir
            }
        };
        let image = Self {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio"),
        };
        for f in [&image.kernel, &image.initramfs] {
            if !f.is_file() {
                return Err(Error::Invalid(format!(
                    "node image file {} missing",
                    f.display()
                )));
            }
        }
        Ok(image)
    }
}

/// A running node (QEMU), killed when dropped.
pub struct Node {
    child: Child,
    /// QEMU's stdin: the serial console's input, multiplexed with QEMU's monitor (`mon:stdio`).
    stdin: Option<std::process::ChildStdin>,
    console: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
    /// The local port forwarded to the agent's TCP API.
    pub api_port: u16,
}

impl Node {
    /// Boots `image` with `state_disk` (a raw file) as /dev/vda and the agent's API forwarded
    /// to a free local port.
    pub fn boot(image: &NodeImage, state_disk: &Path, cpus: u32, memory_mib: u32) -> Result<Self> {
        Self::boot_with(image, state_disk, cpus, memory_mib, "")
    }

    /// [`Node::boot`] with `extra` on the kernel command line (e.g. `gridnode.args=...`).
    pub fn boot_with(
        image: &NodeImage,
        state_disk: &Path,
        cpus: u32,
        memory_mib: u32,
        extra: &str,
    ) -> Result<Self> {
        let api_port = free_port()?;
        let append = format!(
            "console=ttyS0 panic=-1 gridnode.state=/dev/vda gridnode.ip={NODE_IP}/24,gw=10.0.2.2 gridnode.port={AGENT_PORT} {extra}"
        );
        let mut cmd = Command::new(qemu::qemu_binary()?);
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm"])
            .args(["-smp", &cpus.to_string(), "-m", &memory_mib.to_string()])
            .args(["-nographic", "-no-reboot", "-serial", "mon:stdio"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=writeback",
                state_disk.display()
            ))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{api_port}-{NODE_IP}:{AGENT_PORT}"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("starting {cmd:?}")))?;
        let stdin = child.stdin.take();
        let console = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stdout.take().map(|mut out| {
            let console = Arc::clone(&console);
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let Ok(mut c) = console.lock() else { break };
                    c.extend_from_slice(&buf[..n]);
                }
            })
        });
        Ok(Self {
            child,
            stdin,
            console,
            reader,
            started,
            api_port,
        })
    }

    /// The console so far.
    pub fn console(&self) -> String {
        let c = self.console.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&c).into_owned()
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until `needle` is on the console; returns the time since QEMU started.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Invalid(format!(
                    "the node ended ({status}) before {needle:?}:\n{}",
                    self.console()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    timeout,
                    console: self.console(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the magic SysRq `key` on the serial console: a break (QEMU's `Ctrl-A b`), then
    /// the key. The kernel acts on it when its SysRq mask allows that function (boot with
    /// `sysrq_always_enabled` for all of them).
    pub fn serial_sysrq(&mut self, key: u8) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Invalid("the node's console input is closed".into()))?;
        stdin
            .write_all(b"\x01b")
            .and_then(|()| stdin.flush())
            .map_err(Error::io(
                "sending a break to the node's console".to_string(),
            ))?;
        thread::sleep(Duration::from_millis(500));
        stdin
            .write_all(&[key])
            .and_then(|()| stdin.flush())
            .map_err(Error::io(
                "sending a SysRq key to the node's console".to_string(),
            ))
    }

    /// Powers the node off the hard way (QEMU killed) and returns its console.
    pub fn kill(mut self) -> String {
        self.stop();
        self.console()
    }

    fn stop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        if let Some(r) = self.reader.take() {
            r.join().ok();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(Error::io("binding a local port".to_string()))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(Error::io("local port".to_string()))
}

/// What the agent logs once the node is registered.
pub const REGISTERED: &str = "node_agent::uptime: registered";

/// The `node-agent` CLI (the release build beside the node image's) on this host, talking to a
/// node's TCP API as a twin whose key is `key`.
pub struct AgentCli {
    pub bin: PathBuf,
    pub key: PathBuf,
    /// `http://127.0.0.1:PORT`, the node's forwarded API.
    pub agent: String,
}

impl AgentCli {
    /// For `node`, with the twin key at `key` (made by [`AgentCli::register_twin`]).
    pub fn new(node: &Node, key: PathBuf) -> Self {
        Self {
            bin: artifacts::target_dir().join("release/node-agent"),
            key,
            agent: format!("http://127.0.0.1:{}", node.api_port),
        }
    }

    /// Runs `node-agent ARGS`: Ok(stdout) on success, Err(stdout + stderr) otherwise.
    pub fn run(&self, args: &[&str]) -> std::result::Result<String, String> {
        self.exec(args, false)
    }

    /// Runs `node-agent ARGS --key KEY --agent AGENT` (a request signed by the twin).
    pub fn signed(&self, args: &[&str]) -> std::result::Result<String, String> {
        self.exec(args, true)
    }

    /// As [`AgentCli::signed`], but the CLI is killed if it has not ended within `timeout`
    /// (an Err that says so).
    pub fn signed_within(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> std::result::Result<String, String> {
        self.exec_within(args, true, Some(timeout))
    }

    fn exec(&self, args: &[&str], signed: bool) -> std::result::Result<String, String> {
        self.exec_within(args, signed, None)
    }

    fn exec_within(
        &self,
        args: &[&str],
        signed: bool,
        timeout: Option<Duration>,
    ) -> std::result::Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        if signed {
            cmd.arg("--key")
                .arg(&self.key)
                .args(["--agent", &self.agent]);
        }
        let running = |e: std::io::Error| format!("running {}: {e}", self.bin.display());
        let out = match timeout {
            None => cmd.output().map_err(running)?,
            Some(timeout) => {
                let mut child = cmd
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(running)?;
                // Drained while it runs, so a full pipe never stalls it.
                let drain = |r: Option<Box<dyn Read + Send>>| {
                    thread::spawn(move || {
                        let mut buf = Vec::new();
                        if let Some(mut r) = r {
                            let _ = r.read_to_end(&mut buf);
                        }
                        buf
                    })
                };
                let stdout = drain(child.stdout.take().map(|r| Box::new(r) as _));
                let stderr = drain(child.stderr.take().map(|r| Box::new(r) as _));
                let deadline = Instant::now() + timeout;
                let status = loop {
                    match child.try_wait().map_err(running)? {
                        Some(status) => break status,
                        None if Instant::now() >= deadline => {
                            let _ = child.kill();
                            let _ = child.wait();
                            return Err(format!(
                                "node-agent {}: no end within {timeout:?}: killed",
                                args.join(" ")
                            ));
                        }
                        None => thread::sleep(Duration::from_millis(50)),
                    }
                };
                std::process::Output {
                    status,
                    stdout: stdout.join().unwrap_or_default(),
                    stderr: stderr.join().unwrap_or_default(),
                }
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Makes the key, registers it as a twin on the node's embedded registrar (retried while
    /// the API comes up, at most `timeout`) and returns the twin id.
    pub fn register_twin(&self, node: &Node, timeout: Duration) -> Result<u32> {
        let key = self.key.display().to_string();
        self.run(&["keygen", "--out", &key])
            .map_err(|e| Error::Invalid(format!("keygen: {e}")))?;
        let registrar = format!("{}/registrar", self.agent);
        self.until(node, "twin register", timeout, || {
            self.run(&["twin", "register", "--key", &key, "--registrar", &registrar])
                .map(Some)
        })?;
        let twin_file = format!("{key}.twin");
        std::fs::read_to_string(&twin_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| Error::Invalid(format!("twin register wrote no twin id to {twin_file}")))
    }

    /// Retries `f` every `poll` until it gives Some or `timeout` passes; the error names `what`
    /// and carries the last failure and the node's console.
    pub fn until_every<T>(
        &self,
        node: &Node,
        what: &str,
        timeout: Duration,
        poll: Duration,
        mut f: impl FnMut() -> std::result::Result<Option<T>, String>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match f() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => String::new(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(Error::Invalid(format!(
                    "{what}: not done within {timeout:?}: {last}\n--- the node's console:\n{}",
                    node.console()
                )));
            }
            thread::sleep(poll);
        }
    }

    /// [`AgentCli::until_every`] once a second.
    pub fn until<T>(
        &self,
        node: &Node,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> std::result::Result<Option<T>, String>,
    ) -> Result<T> {
        self.until_every(node, what, timeout, Duration::from_secs(1), f)
    }
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl Node {
    /// One raw HTTP/1.1 request to the agent's forwarded API, with `headers` as given (no
    /// signature added): for requests the CLI would never send (unsigned, malformed).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpAnswer> {
        let addr = format!("127.0.0.1:{}", self.api_port);
        let mut s = std::net::TcpStream::connect(&addr)
            .map_err(Error::io(format!("connecting to {addr}")))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(Error::io("socket timeout".to_string()))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        s.write_all(&bytes)
            .map_err(Error::io(format!("sending {method} {path}")))?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .map_err(Error::io(format!("reading the answer to {method} {path}")))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                Error::Invalid(format!("{method} {path}: not an HTTP answer: {text:?}"))
            })?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok(HttpAnswer { status, body })
    }
}

/// Whether `path` exists on the node's ext4 state disk `disk` (the node powered off): the
/// journal is replayed first (`e2fsck -fy`, the node was not shut down cleanly), then
/// `debugfs` looks the path up.
pub fn state_disk_has(disk: &Path, path: &str) -> Result<bool> {
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(disk)
        .output()
        .map_err(Error::io("running e2fsck (e2fsprogs)".to_string()))?;
    // 0: clean, 1: errors corrected (a replayed journal counts).
    if !matches!(fsck.status.code(), Some(0) | Some(1)) {
        return Err(Error::Command {
            command: format!("e2fsck -fy {}", disk.display()),
            status: fsck.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr)
            ),
        });
    }
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(disk)
        .output()
        .map_err(Error::io("running debugfs (e2fsprogs)".to_string()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("File not found") {
        Ok(false)
    } else if text.contains("Inode:") {
        Ok(true)
    } else {
        Err(Error::Invalid(format!(
            "debugfs stat {path} on {}: {text}",
            disk.display()
        )))
    }
}

impl AgentCli {
    /// The twin id `register_twin` wrote beside the key.
    pub fn twin(&self) -> Result<u32> {
        let file = format!("{}.twin", self.key.display());
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| Error::Invalid(format!("no twin id in {file}")))
    }

    /// A request to `node`'s API signed by this twin as the agent's client signs it (the
    /// node's request signature scheme, `node_agent::auth`), with `body` sent as it is: for
    /// documents the CLI would not send (another twin's deployment, one altered after it was
    /// signed). Only ed25519 keys (64 hex digits, `keygen`'s default).
    pub fn raw_signed(
        &self,
        node: &Node,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpAnswer> {
        use ed25519_dalek::Signer as _;
        let text = std::fs::read_to_string(&self.key)
            .map_err(Error::io(format!("reading {}", self.key.display())))?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: not an ed25519 seed (64 hex digits)",
                    self.key.display()
                ))
            })?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let signer = format!("twin:{}", self.twin()?);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| Error::Invalid(format!("the clock: {e}")))?
            .as_secs()
            .to_string();
        let nonce = format!(
            "{:032x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let message = format!(
            "gridnode/request/v1\n{}\n{path}\n{}\n{timestamp}\n{nonce}\n{signer}",
            method.to_ascii_uppercase(),
            blake3::hash(body).to_hex()
        );
        let signature = hex::encode(key.sign(message.as_bytes()).to_bytes());
        node.http(
            method,
            path,
            &[
                ("X-Grid-Signer", &signer),
                ("X-Grid-Timestamp", &timestamp),
                ("X-Grid-Nonce", &nonce),
                ("X-Grid-Signature", &signature),
                ("X-Grid-Signature-Type", "ed25519"),
            ],
            body,
        )
    }
}
