//! Locating, or building on first use, the guest artifacts end-to-end tests need:
//! the guest kernel (guest-kernels/build-kernel.sh, cached outside the repo), guest-init
//! (guest-kernels/build-init.sh), the test guests (guest-kernels/test-guest/build.sh),
//! Unikraft unikernels (guest-kernels/unikernel/build-unikraft.sh) and the vmm binary (found,
//! never built here).
//!
//! Overrides: GUEST_KERNEL_DIR (a dir with vmlinux and bzImage), GUEST_INIT_BIN,
//! VMM_BIN, UNIKRAFT_FC_DIR. Each artifact is built at most once per test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The test-guest variants guest-kernels/test-guest/build.sh produces.
pub const TEST_GUEST_VARIANTS: &[&str] =
    &["exit0", "exit42", "reboot", "triplefault", "chatter", "pvh"];

/// Kernel source package the guest kernel is built from.
const KERNEL_SOURCE: &str = "/usr/src/linux-source-6.12.tar.xz";

/// The built guest kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub dir: PathBuf,
    /// ELF vmlinux with the PVH note.
    pub vmlinux: PathBuf,
    pub bz_image: PathBuf,
}

/// The workspace root (parent of the tests crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// CARGO_TARGET_DIR if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A test's scratch directory, `<target>/e2e-scratch/<name>`, made if missing.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir().join("e2e-scratch").join(name);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// The guest kernel, building it (about 10 minutes on 2 cores) if not cached.
/// `Error::Missing` when the kernel sources are not installed.
pub fn guest_kernel() -> Result<GuestKernel> {
    static CACHE: Mutex<Option<GuestKernel>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = cache.as_ref() {
        return Ok(k.clone());
    }
    let dir = match std::env::var_os("GUEST_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            if !Path::new(KERNEL_SOURCE).is_file() {
                return Err(Error::Missing {
                    what: format!("guest kernel source {KERNEL_SOURCE}"),
                    hint: "apt-get install linux-source-6.12 (or set GUEST_KERNEL_DIR)".into(),
                });
            }
            run_script(Command::new("bash").arg(guest_kernels_dir().join("build-kernel.sh")))?
        }
    };
    let kernel = GuestKernel {
        vmlinux: existing(dir.join("vmlinux"))?,
        bz_image: existing(dir.join("bzImage"))?,
        dir,
    };
    *cache = Some(kernel.clone());
    Ok(kernel)
}

/// The static guest-init binary, built in `<target>/guest-artifacts` if needed.
pub fn guest_init() -> Result<PathBuf> {
    static CACHE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = cache.as_ref() {
        return Ok(p.clone());
    }
    let path = match std::env::var_os("GUEST_INIT_BIN") {
        Some(p) => existing(PathBuf::from(p))?,
        None => guest_program("guest-init")?,
    };
    *cache = Some(path.clone());
    Ok(path)
}

/// A workspace program that runs inside Linux guests (`guest-init`, `guest-fsbench`), built
/// static by `guest-kernels/build-init.sh` into `<target>/guest-artifacts`.
pub fn guest_program(package: &str) -> Result<PathBuf> {
    // A separate target dir: the outer `cargo test` may hold the main one's lock.
    existing(run_script(
        Command::new("bash")
            .arg(guest_kernels_dir().join("build-init.sh"))
            .arg(package)
            .env("CARGO_TARGET_DIR", target_dir().join("guest-artifacts")),
    )?)
}

/// A test-guest variant (see `TEST_GUEST_VARIANTS`), built into `<target>/test-guest`.
pub fn test_guest(variant: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    if !TEST_GUEST_VARIANTS.contains(&variant) {
        return Err(Error::UnknownVariant(variant.to_owned()));
    }
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let dir = match built.as_ref() {
        Some(d) => d.clone(),
        None => {
            let out = target_dir().join("test-guest");
            let dir = run_script(
                Command::new("bash")
                    .arg(guest_kernels_dir().join("test-guest/build.sh"))
                    .arg(&out),
            )?;
            *built = Some(dir.clone());
            dir
        }
    };
    existing(dir.join(format!("test-guest-{variant}")))
}

/// Unikraft unikernels built for its Firecracker platform (ELF, Linux 64-bit boot entry,
/// console on COM1, exit through the i8042 reset).
#[derive(Debug, Clone)]
pub struct UnikraftImages {
    /// Unikraft's helloworld application as published: prints "Hello world!" and halts.
    pub helloworld: PathBuf,
    /// The same unikernel with a main that crashes (an undefined instruction).
    pub crash: PathBuf,
}

/// Exit status of build-unikraft.sh when a source repository cannot be cloned.
const UNIKRAFT_SOURCES_MISSING: i32 = 3;

/// The Unikraft images: $UNIKRAFT_FC_DIR, else guest-kernels/unikernel/build-unikraft.sh
/// (cached; a first build needs Unikraft's and its helloworld app's git repositories, given
/// as $UNIKRAFT_SOURCE and $UNIKRAFT_APP_SOURCE where the public ones are out of reach).
/// `Error::Missing` when they cannot be cloned.
pub fn unikraft_images() -> Result<UnikraftImages> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_build_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = match std::env::var_os("UNIKRAFT_FC_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let script = guest_kernels_dir().join("unikernel/build-unikraft.sh");
            let mut cmd = Command::new("bash");
            cmd.arg(&script);
            if let Some(source) = std::env::var_os("UNIKRAFT_SOURCE") {
                cmd.arg(source);
                if let Some(app) = std::env::var_os("UNIKRAFT_APP_SOURCE") {
                    cmd.arg(app);
                }
            }
            match run_script(&mut cmd) {
                Err(Error::Command { status, .. })
                    if status.ends_with(&format!("exit status: {UNIKRAFT_SOURCES_MISSING}")) =>
                {
                    return Err(Error::Missing {
                        what: "Unikraft's sources".into(),
                        hint: format!(
                            "set UNIKRAFT_SOURCE and UNIKRAFT_APP_SOURCE to clones of unikraft \
                             and app-helloworld (see {})",
                            script.display()
                        ),
                    })
                }
                other => other?,
            }
        }
    };
    Ok(UnikraftImages {
        helloworld: existing(dir.join("helloworld"))?,
        crash: existing(dir.join("crash"))?,
    })
}

/// The vmm binary: $VMM_BIN, else the newest of `<target>/{debug,release}/vmm` (also
/// under `<workspace>/target`). Not built here: run `cargo build -p vmm` first.
pub fn vmm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return existing(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    for base in [target_dir(), workspace_root().join("target")] {
        for profile in ["debug", "release"] {
            candidates.push(base.join(profile).join("vmm"));
        }
    }
    candidates
        .into_iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| Error::Missing {
            what: "the vmm binary".into(),
            hint: format!(
                "run `cargo build -p vmm` (looked in {}/{{debug,release}}) or set VMM_BIN",
                target_dir().display()
            ),
        })
}

fn guest_kernels_dir() -> PathBuf {
    workspace_root().join("guest-kernels")
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::BadFile {
            path,
            problem: "expected artifact does not exist".into(),
        })
    }
}

/// Runs a build script (its stderr shown as progress) and returns its last stdout line.
fn run_script(cmd: &mut Command) -> Result<PathBuf> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(Error::io(format!("starting {shown}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: "see the script's messages above".into(),
        });
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| Error::Invalid(format!("{shown} printed no output path")))
}
