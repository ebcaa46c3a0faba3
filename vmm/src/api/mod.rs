//! The control API and the vmm's controller thread.
//!
//! One thread (`vmm-ctl`, its own seccomp filter) waits on: the API's unix socket (HTTP/1.1 +
//! JSON, routes in [`routes`], documented in vmm/api/openapi.yaml), the SIGTERM event (a
//! graceful shutdown; a second SIGTERM kills), and a requested shutdown's deadline. Clients
//! are served one at a time, each connection bounded in time and size, so no client can stop
//! the others for long, and nothing a client sends reaches the guest or panics the vmm.

pub mod http;
pub mod metrics;
pub mod routes;
pub mod signals;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::VmControl;
use crate::seccomp::ThreadFilter;

/// How long a client may take to send a request, and a connection may stay open.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// Requests served on one connection before it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control API socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("control API socket {0}: the path exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    #[error("cannot start the controller thread: {0}")]
    Thread(std::io::Error),
}

/// Binds the API socket at `path` (mode 0600). A socket left by an earlier vmm that was
/// killed is replaced; any other file there is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |what| {
        move |source| ApiError::Socket {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(err("cannot remove the stale socket"))?
        }
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("cannot inspect the path")(e)),
    }
    // The socket file takes the umask's complement of 0777: create it 0600.
    // SAFETY: umask only swaps the process's mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: see above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(err("cannot listen"))?;
    listener
        .set_nonblocking(true)
        .map_err(err("cannot make it non-blocking"))?;
    Ok(listener)
}

/// Starts the controller thread. It installs `filter` before serving anything.
pub fn spawn_controller(
    control: Arc<VmControl>,
    listener: Option<UnixListener>,
    filter: Arc<ThreadFilter>,
) -> Result<std::thread::JoinHandle<()>, ApiError> {
    std::thread::Builder::new()
        .name("vmm-ctl".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::apply_to_current_thread(&filter) {
                control.end(crate::exit::VmExit::Fault(format!(
                    "the controller thread cannot run without its seccomp filter: {e}"
                )));
                return;
            }
            run(&control, listener.as_ref());
        })
        .map_err(ApiError::Thread)
}

fn run(control: &VmControl, listener: Option<&UnixListener>) {
    let terms = signals::term_events();
    let mut terms_seen = 0u64;
    loop {
        if control.exit().has_ended() {
            return;
        }
        let timeout = match control.shutdown_deadline() {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    control.shutdown_timed_out();
                    return;
                }
                poll_timeout(deadline - now)
            }
            None => -1,
        };
        let mut fds = Vec::with_capacity(2);
        if let Some(events) = terms {
            fds.push(libc::pollfd {
                fd: events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(listener) = listener {
            fds.push(libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("controller: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if let Some(events) = terms {
            if let Ok(n) = events.read() {
                terms_seen += n;
                if terms_seen == n {
                    tracing::info!("SIGTERM: shutting the VM down");
                    control.shutdown();
                } else {
                    control.end(crate::exit::VmExit::Killed(
                        "a second SIGTERM during the shutdown".into(),
                    ));
                    return;
                }
            }
        }
        if let Some(listener) = listener {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => serve_connection(control, stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("control API: accept failed: {e}");
                        break;
                    }
                }
            }
        }
    }
}

fn poll_timeout(left: Duration) -> libc::c_int {
    libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(libc::c_int::MAX)
}

/// Serves requests on one connection until the client closes it, asks to, errs, or the
/// connection's lifetime is up.
fn serve_connection(control: &VmControl, mut stream: UnixStream) {
    let opened = Instant::now();
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(CLIENT_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err()
    {
        return;
    }
    let mut pending = Vec::new();
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        let (response, close) = match http::read_request(&mut stream, &mut pending) {
            http::ReadOutcome::Closed => return,
            http::ReadOutcome::Bad(response) => (response, true),
            http::ReadOutcome::Request(request) => {
                let response = routes::handle(control, &request);
                let close = request.close
                    || served == MAX_REQUESTS_PER_CONNECTION
                    || opened.elapsed() >= CONNECTION_LIFETIME;
                (response, close)
            }
        };
        if http::write_response(&mut stream, &response, close).is_err() || close {
            let _ = stream.flush();
            return;
        }
    }
}
