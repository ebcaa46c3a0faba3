//! Console output for init: stdio on /dev/console and `init: ...` log lines.
//!
//! Writes go straight to fd 2 with write(2) and ignore failures, so logging can never
//! panic (unlike `println!`, which panics when stdout is gone).

use std::os::fd::AsRawFd;

/// Opens /dev/console and makes it fd 0, 1 and 2. Leaves stdio as the kernel set it up if
/// /dev/console cannot be opened.
pub fn attach_stdio() {
    let console = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(f) => f,
        Err(e) => {
            log(&format!(
                "cannot open /dev/console, keeping inherited stdio: {e}"
            ));
            return;
        }
    };
    let fd = console.as_raw_fd();
    for target in 0..=2 {
        // SAFETY: dup2 on an fd we own, onto the standard descriptors.
        if unsafe { libc::dup2(fd, target) } < 0 {
            log(&format!(
                "cannot attach fd {target} to /dev/console: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Prints `init: <msg>` on its own line to stderr (the console).
pub fn log(msg: &str) {
    let line = format!("init: {msg}\n");
    write_all(2, line.as_bytes());
}

fn write_all(fd: libc::c_int, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        buf = buf.get(n as usize..).unwrap_or_default();
    }
}
