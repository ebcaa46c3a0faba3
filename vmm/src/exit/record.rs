//! The exit record file: `{status, reason, kind, at, at_unix_ms}` at the spec's `exit_record`
//! path, written atomically (a temporary file beside it, synced, renamed over it).
//!
//! The record's directory is opened once, at start, before any thread is confined: every
//! write goes through that descriptor (`openat`/`renameat`), with names prepared then, so
//! the main thread can write the record at any point of its life, even from a signal handler
//! ([`RecordFile::write_bytes`] makes async-signal-safe calls only, and
//! [`render_seccomp_record`] renders a record without allocating).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vm_spec::api::ExitRecord;

/// The record of this vmm process, once [`install`]ed.
static INSTALLED: OnceLock<RecordFile> = OnceLock::new();

/// Where a vmm writes how it ended.
#[derive(Debug)]
pub struct RecordFile {
    /// The record's directory (O_RDONLY|O_DIRECTORY, so it can also be synced).
    dir: OwnedFd,
    /// The record's name in `dir`.
    name: CString,
    /// The temporary file's name in `dir` (`NAME.tmpPID`).
    temp: CString,
    path: PathBuf,
}

impl RecordFile {
    /// Opens the directory of the record at `path`. The record itself is not touched.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let invalid = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: {what}", path.display()),
            )
        };
        let name = path.file_name().ok_or_else(|| invalid("not a file path"))?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut temp = name.to_owned();
        temp.push(format!(".tmp{}", std::process::id()));
        let c = |bytes: &[u8]| CString::new(bytes).map_err(|_| invalid("a NUL byte in the path"));
        let dir_c = c(dir.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                dir_c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot open the directory {}: {e}", dir.display()),
            ));
        }
        Ok(Self {
            // SAFETY: a descriptor just opened and owned by nobody else.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            name: c(name.as_bytes())?,
            temp: c(temp.as_bytes())?,
            path: path.to_path_buf(),
        })
    }

    /// The record's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes a record left by an earlier run of the same VM, so a supervisor never takes it
    /// for this run's end. A missing record is fine.
    pub fn clear(&self) -> std::io::Result<()> {
        // SAFETY: a NUL-terminated name relative to the open directory.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            e => Err(e),
        }
    }

    /// Writes `record` (pretty JSON and a newline).
    pub fn write(&self, record: &ExitRecord) -> std::io::Result<()> {
        let mut json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        json.push(b'\n');
        self.write_bytes(&json)
            .map_err(std::io::Error::from_raw_os_error)
    }

    /// Writes `bytes` as the record, atomically: the temporary file (mode 0644, never through
    /// a symbolic link) is written, synced and renamed over the record, then the directory is
    /// synced. On failure the temporary file is removed and the errno returned.
    ///
    /// Async-signal-safe: openat, write, fsync, renameat, unlinkat and close only, no
    /// allocation.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<(), i32> {
        let dir = self.dir.as_raw_fd();
        let errno = || {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: NUL-terminated names relative to the open directory; `bytes` is valid for
        // its length; the temporary descriptor is closed on every path.
        unsafe {
            let fd = libc::openat(
                dir,
                self.temp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644 as libc::c_uint,
            );
            if fd < 0 {
                return Err(errno());
            }
            let mut written = 0;
            let mut failed = None;
            while written < bytes.len() {
                let n = libc::write(fd, bytes[written..].as_ptr().cast(), bytes.len() - written);
                if n < 0 {
                    let e = errno();
                    if e != libc::EINTR {
                        failed = Some(e);
                        break;
                    }
                } else {
                    written += n as usize;
                }
            }
            if failed.is_none() && libc::fsync(fd) != 0 {
                failed = Some(errno());
            }
            libc::close(fd);
            if failed.is_none()
                && libc::renameat(dir, self.temp.as_ptr(), dir, self.name.as_ptr()) != 0
            {
                failed = Some(errno());
            }
            if let Some(e) = failed {
                libc::unlinkat(dir, self.temp.as_ptr(), 0);
                return Err(e);
            }
            // The rename itself survives a host crash once the directory is synced.
            libc::fsync(dir);
        }
        Ok(())
    }
}

/// Makes `file` this process's record (for ends no caller reports: panics, seccomp traps).
/// Call once, before other threads start.
pub fn install(file: RecordFile) -> &'static RecordFile {
    INSTALLED.get_or_init(|| file)
}

/// This process's record, if it has one.
pub fn installed() -> Option<&'static RecordFile> {
    INSTALLED.get()
}

/// A fixed buffer a record is rendered into without allocating.
pub struct RecordBuf {
    bytes: [u8; 512],
    len: usize,
}

impl Default for RecordBuf {
    fn default() -> Self {
        Self {
            bytes: [0; 512],
            len: 0,
        }
    }
}

impl RecordBuf {
    /// What was rendered.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Appends `bytes`, as much as fits.
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_u64(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }

    fn push_i64(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        self.push_u64(value.unsigned_abs());
    }
}

/// The part of a thread name shown in a record or message: letters, digits, `-`, `_` and
/// `.`, anything else as `?` (a thread can rename itself; its name must not break the JSON).
pub fn printable_thread_name(raw: &[u8], out: &mut [u8; 16]) -> usize {
    let mut len = 0;
    for &b in raw.iter().take_while(|&&b| b != 0).take(out.len()) {
        out[len] = if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            b
        } else {
            b'?'
        };
        len += 1;
    }
    len
}

/// The vmm's status when one of its threads made a system call its seccomp filter forbids
/// (128 + SIGSYS, as the process would report if the signal killed it).
pub const SECCOMP_STATUS: i32 = 128 + libc::SIGSYS;

/// Renders, without allocating, the record of a seccomp violation: thread `thread` (raw
/// name, see [`printable_thread_name`]) made system call `syscall`, at `unix_ms`.
pub fn render_seccomp_record(thread: &[u8], syscall: i64, unix_ms: u64) -> RecordBuf {
    let mut name = [0u8; 16];
    let name_len = printable_thread_name(thread, &mut name);
    let mut buf = RecordBuf::default();
    buf.push(b"{\"status\":");
    buf.push_i64(i64::from(SECCOMP_STATUS));
    buf.push(b",\"reason\":\"seccomp: thread ");
    buf.push(&name[..name_len]);
    buf.push(b" made forbidden system call ");
    buf.push_i64(syscall);
    buf.push(b"; the vmm ended at once\",\"kind\":\"vmm_error\",\"at\":\"");
    buf.push(&vm_spec::api::rfc3339_utc_bytes(unix_ms));
    buf.push(b"\",\"at_unix_ms\":");
    buf.push_u64(unix_ms);
    buf.push(b"}\n");
    buf
}

/// Milliseconds since the Unix epoch, from clock_gettime (async-signal-safe).
pub fn now_unix_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec.max(0) as u64 / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_spec::api::ExitKind;

    #[test]
    fn records_are_written_whole_through_the_directory_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let file = RecordFile::open(&path).unwrap();
        file.clear().unwrap();
        std::fs::write(&path, b"stale").unwrap();
        file.clear().unwrap();
        assert!(!path.exists());
        let record = crate::exit::VmExit::Killed("killed through the control API".into()).record();
        file.write(&record).unwrap();
        let back: ExitRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, record);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_record_is_never_written_through_a_symlinked_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let file = RecordFile::open(&path).unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let temp = dir
            .path()
            .join(format!("exit.json.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &temp).unwrap();
        assert_eq!(file.write_bytes(b"{}"), Err(libc::ELOOP));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!path.exists());
    }

    #[test]
    fn a_missing_directory_is_named() {
        let e = RecordFile::open(Path::new("/nonexistent/dir/exit.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir"), "{e}");
        assert!(RecordFile::open(Path::new("/")).is_err());
        // A bare name is in the current directory.
        assert_eq!(
            RecordFile::open(Path::new("exit.json")).unwrap().path(),
            Path::new("exit.json")
        );
    }

    #[test]
    fn seccomp_records_render_without_allocating_as_valid_records() {
        let buf = render_seccomp_record(b"vcpu0\0\0\0", 321, 1_796_225_346_123);
        let record: ExitRecord = serde_json::from_slice(buf.as_bytes()).unwrap();
        assert_eq!(record.status, 159);
        assert_eq!(record.kind, ExitKind::VmmError);
        assert_eq!(
            record.reason,
            "seccomp: thread vcpu0 made forbidden system call 321; the vmm ended at once"
        );
        assert_eq!(record.at, "2026-12-02T15:29:06.123Z");
        assert_eq!(record.at_unix_ms, 1_796_225_346_123);
        // A hostile thread name cannot break the JSON.
        let buf = render_seccomp_record(b"a\"b\\c\n{}xxxxxxxxxxxxxxx", -1, 0);
        let record: ExitRecord = serde_json::from_slice(buf.as_bytes()).unwrap();
        assert!(
            record
                .reason
                .starts_with("seccomp: thread a?b?c???xxxxxxxx made"),
            "{}",
            record.reason
        );
        assert!(now_unix_ms() > 1_700_000_000_000);
    }
}
