//! From a VM workload to the vmm's spec: where its files live on the node, which image files
//! it runs (fetched and checked), and the `VmSpec` the vmm is started with.
//!
//! Layout under the state directory (all 0700):
//! - `vms/<twin>/<deployment>/<name>/`: `layer/` (the root image's writable layer),
//!   `volumes/<volume>/`, `spec.json`, `console.log` (+ `.1`), `exit.json`, `vmm.log`;
//!   kept across restarts and updates, removed with the workload.
//! - `run/<id>.sock`: the vmm's API socket (short path: unix socket paths are limited).
//! - `images/<blake3 of the URL>.flist`: images fetched from `http(s)` URLs.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vm_spec::{FsSpec, GuestMount, RngSpec, SerialOutput, VmSpec};

use crate::config::AgentConfig;
use crate::deployment::VmWorkload;
use crate::network::{cmdline, VmNetwork};

/// Largest image (flist metadata) file fetched from a URL.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;
const MIB: u64 = 1 << 20;

/// Which VM: (twin, deployment, name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    pub twin_id: u32,
    pub deployment_id: u64,
    pub name: String,
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.twin_id, self.deployment_id, self.name)
    }
}

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub layer: PathBuf,
    pub volumes: PathBuf,
    pub spec: PathBuf,
    pub console: PathBuf,
    pub exit_record: PathBuf,
    pub vmm_log: PathBuf,
    pub api_sock: PathBuf,
}

pub fn deployment_dir(state_dir: &Path, twin_id: u32, deployment_id: u64) -> PathBuf {
    state_dir
        .join("vms")
        .join(twin_id.to_string())
        .join(deployment_id.to_string())
}

impl VmPaths {
    pub fn new(state_dir: &Path, key: &VmKey) -> Self {
        let dir = deployment_dir(state_dir, key.twin_id, key.deployment_id).join(&key.name);
        let id = blake3::hash(key.to_string().as_bytes()).to_hex();
        Self {
            layer: dir.join("layer"),
            volumes: dir.join("volumes"),
            spec: dir.join("spec.json"),
            console: dir.join("console.log"),
            exit_record: dir.join("exit.json"),
            vmm_log: dir.join("vmm.log"),
            api_sock: state_dir.join("run").join(format!("{}.sock", &id[..16])),
            dir,
        }
    }

    pub fn create(&self) -> Result<()> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        for d in [&self.dir, &self.layer, &self.volumes] {
            b.create(d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        if let Some(run) = self.api_sock.parent() {
            b.create(run)
                .with_context(|| format!("creating {}", run.display()))?;
        }
        Ok(())
    }
}

/// Makes the image available as a local file: a node path is used as is, a URL is fetched
/// once (bounded) into `images/`; a given BLAKE3 is checked either way.
pub fn resolve_image(state_dir: &Path, image: &str, blake3_hex: Option<&str>) -> Result<PathBuf> {
    let path = if image.starts_with("http://") || image.starts_with("https://") {
        let dir = state_dir.join("images");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let name = blake3::hash(image.as_bytes()).to_hex();
        let path = dir.join(format!("{name}.flist"));
        if !path.exists() {
            fetch(image, &path)?;
        }
        path
    } else {
        PathBuf::from(image)
    };
    let meta = fs::metadata(&path).with_context(|| format!("image {image}: {}", path.display()))?;
    if !meta.is_file() {
        bail!("image {image} is not a file");
    }
    if let Some(want) = blake3_hex {
        let got = hash_file(&path)?;
        if !got.eq_ignore_ascii_case(want) {
            if path.starts_with(state_dir) {
                let _ = fs::remove_file(&path);
            }
            bail!("image {image} has BLAKE3 {got}, the deployment expects {want}");
        }
    }
    Ok(path)
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn fetch(url: &str, dest: &Path) -> Result<()> {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(300))
        .build();
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("fetching image {url}"))?;
    // Without redirects followed, a 3xx comes back as an answer: its body is not the image.
    if resp.status() != 200 {
        bail!(
            "fetching image {url}: the server answered {} {} (redirects are not followed)",
            resp.status(),
            resp.status_text()
        );
    }
    let tmp = dest.with_extension("partial");
    let mut out = fs::File::create(&tmp)?;
    let copied = std::io::copy(&mut resp.into_reader().take(MAX_IMAGE_BYTES + 1), &mut out)?;
    if copied > MAX_IMAGE_BYTES {
        let _ = fs::remove_file(&tmp);
        bail!("image {url} is larger than {} MiB", MAX_IMAGE_BYTES / MIB);
    }
    out.sync_all()?;
    fs::rename(&tmp, dest)?;
    Ok(())
}

/// The spec the vmm runs for `vm`, given its resolved image files (root, then each mount).
pub fn build(
    config: &AgentConfig,
    vm: &VmWorkload,
    paths: &VmPaths,
    root_image: &Path,
    mount_images: &[PathBuf],
    net: Option<&VmNetwork>,
) -> Result<VmSpec> {
    let mut spec = VmSpec::new(config.vmm.kernel.clone());
    spec.initrd = Some(config.vmm.initrd.clone());
    spec.cmdline = config.vmm.cmdline.clone();
    if let Some(net) = net {
        // The devices (taps on the NAT bridge by name, taps in private networks' namespaces
        // as fds the supervisor passes), and the guest's addresses, routes and name servers
        // on its command line.
        spec.net = net.net_specs(crate::supervisor::FIRST_INHERITED_FD);
        spec.cmdline = cmdline::append(&spec.cmdline, &net.guest.to_cmdline());
    }
    spec.vcpus = vm.vcpus;
    spec.memory_mib = vm.memory_mib;
    spec.entrypoint = std::iter::once(vm.entrypoint.clone())
        .chain(vm.args.iter().cloned())
        .collect();
    spec.env = vm.env.clone();
    spec.serial = SerialOutput::Log {
        path: paths.console.clone(),
        max_bytes: config.vmm.console_max_bytes,
    };
    let mut root = FsSpec::layered_image("root", root_image, &paths.layer);
    root.max_bytes = Some(vm.rootfs_mib.saturating_mul(MIB));
    spec.fs.push(root);
    spec.root = Some("root".into());
    for (i, v) in vm.volumes.iter().enumerate() {
        let dir = paths.volumes.join(&v.name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)?;
        let tag = format!("vol{i}");
        let mut share = FsSpec::dir(&tag, dir, false);
        share.max_bytes = Some(v.size_mib.saturating_mul(MIB));
        spec.fs.push(share);
        spec.mounts.push(GuestMount {
            tag,
            path: v.mount.clone(),
        });
    }
    for (i, (m, image)) in vm.mounts.iter().zip(mount_images).enumerate() {
        let tag = format!("mnt{i}");
        spec.fs.push(FsSpec::image(&tag, image));
        spec.mounts.push(GuestMount {
            tag,
            path: m.mount.clone(),
        });
    }
    spec.rng = Some(RngSpec::default());
    spec.shutdown_grace_secs = vm.shutdown_grace_secs;
    spec.api_sock = Some(paths.api_sock.clone());
    spec.exit_record = Some(paths.exit_record.clone());
    spec.validate()
        .context("the workload makes an invalid VM spec")?;
    Ok(spec)
}

/// The hash that tells whether a running VM runs this spec.
pub fn spec_hash(spec: &VmSpec) -> String {
    crate::canonical::hash(spec)
        .map(|h| hex::encode(&h[..16]))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::tests::sample;

    #[test]
    fn spec_has_root_layer_volumes_and_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig {
            state_dir: dir.path().into(),
            ..Default::default()
        };
        let d = sample(1, 0);
        let vm = d.vm("web").unwrap();
        let key = VmKey {
            twin_id: 1,
            deployment_id: 1,
            name: "web".into(),
        };
        let paths = VmPaths::new(dir.path(), &key);
        paths.create().unwrap();
        let spec = build(
            &cfg,
            vm,
            &paths,
            Path::new("/images/alpine.flist"),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(spec.root.as_deref(), Some("root"));
        assert_eq!(spec.fs.len(), 2);
        assert_eq!(spec.fs[0].writable_layer(), Some(paths.layer.as_path()));
        assert_eq!(spec.fs[0].max_bytes, Some(256 * MIB));
        assert_eq!(
            spec.mounts,
            vec![GuestMount {
                tag: "vol0".into(),
                path: "/data".into()
            }]
        );
        assert_eq!(spec.entrypoint, vec!["/bin/sh", "-c", "echo hi"]);
        assert!(paths.api_sock.as_os_str().len() < 100);
        // The hash follows the spec.
        let mut other = spec.clone();
        other.memory_mib += 1;
        assert_ne!(spec_hash(&spec), spec_hash(&other));
    }

    #[test]
    fn image_hash_mismatch_is_refused_with_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.flist");
        fs::write(&img, b"image").unwrap();
        let right = blake3::hash(b"image").to_hex().to_string();
        resolve_image(dir.path(), img.to_str().unwrap(), Some(&right)).unwrap();
        let wrong = "0".repeat(64);
        let err = resolve_image(dir.path(), img.to_str().unwrap(), Some(&wrong)).unwrap_err();
        assert!(err.to_string().contains(&right), "{err}");
        assert!(resolve_image(dir.path(), "/nonexistent.flist", None).is_err());
    }

    /// Serves one canned HTTP answer per connection, in order; returns the base URL.
    fn serve(answers: Vec<Vec<u8>>) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for answer in answers {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = reader.get_mut().write_all(&answer);
            }
        });
        url
    }

    fn answer(status: &str, extra: &str, body: &[u8]) -> Vec<u8> {
        let mut a = format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(body);
        a
    }

    #[test]
    fn an_image_by_url_is_fetched_once_checked_and_redirects_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"flist metadata".to_vec();
        let good = blake3::hash(&body).to_hex().to_string();
        let base = serve(vec![
            answer("200 OK", "", &body),
            answer("200 OK", "", b"something else"),
            answer(
                "302 Found",
                "Location: http://example.invalid/x\r\n",
                b"moved",
            ),
            answer("404 Not Found", "", b"no"),
        ]);
        // Fetched into images/, checked against its BLAKE3.
        let url = format!("{base}/root.flist");
        let path = resolve_image(dir.path(), &url, Some(&good)).unwrap();
        assert!(path.starts_with(dir.path().join("images")));
        assert_eq!(fs::read(&path).unwrap(), body);
        // Kept: the same URL again needs no server answer (the next canned one differs).
        assert_eq!(resolve_image(dir.path(), &url, Some(&good)).unwrap(), path);
        // Another URL whose content has another hash: refused, and nothing kept.
        let other = format!("{base}/other.flist");
        let err = resolve_image(dir.path(), &other, Some(&good)).unwrap_err();
        assert!(err.to_string().contains("the deployment expects"), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("images")).unwrap().count(), 1);
        // A redirect is not followed and its body is not taken for the image.
        let moved = format!("{base}/moved.flist");
        let err = format!("{:#}", resolve_image(dir.path(), &moved, None).unwrap_err());
        assert!(err.contains("302"), "{err}");
        let err = format!(
            "{:#}",
            resolve_image(dir.path(), &format!("{base}/gone.flist"), None).unwrap_err()
        );
        assert!(err.contains("404"), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("images")).unwrap().count(), 1);
    }
}
