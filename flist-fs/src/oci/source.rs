//! Locating an OCI image's layers: an image-layout directory (`index.json`, `blobs/`), or a
//! `docker save` tarball (extracted to a staging directory, then either its `manifest.json` or
//! its OCI layout is used; linked layer files are resolved inside the archive). Nested indexes
//! pick linux/amd64, else the first manifest.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// One layer blob, in application order.
#[derive(Clone, Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub name: String,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

/// What an image source yields: its layers in order and its config blob, if any.
#[derive(Clone, Debug)]
pub struct Found {
    pub layers: Vec<Layer>,
    pub config: Option<PathBuf>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Config", default)]
    config: Option<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn oci_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Oci {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(root: &Path, file: &Path) -> Result<T> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    serde_json::from_slice(&bytes).map_err(|e| oci_err(root, format!("{}: {e}", file.display())))
}

/// A path inside `root` from a relative name found in image JSON; rejects escapes.
fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(oci_err(root, format!("path {rel:?} escapes the image")));
    }
    Ok(root.join(p))
}

fn blob(root: &Path, digest: &str) -> Result<PathBuf> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| oci_err(root, format!("malformed digest {digest:?}")))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit())
        || !algo.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(oci_err(root, format!("malformed digest {digest:?}")));
    }
    let p = root.join("blobs").join(algo).join(hex);
    if !p.is_file() {
        return Err(oci_err(root, format!("missing blob {digest}")));
    }
    Ok(p)
}

fn layers_from_layout(root: &Path, reference: Option<&str>) -> Result<Found> {
    let index: Index = read_json(root, &root.join("index.json"))?;
    let mut candidates = index.manifests;
    if let Some(r) = reference {
        candidates.retain(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
                == Some(r)
                || d.annotations
                    .get("io.containerd.image.name")
                    .map(String::as_str)
                    == Some(r)
        });
        if candidates.is_empty() {
            return Err(oci_err(root, format!("no image with reference {r:?}")));
        }
    }
    let mut desc = candidates
        .into_iter()
        .next()
        .ok_or_else(|| oci_err(root, "index.json lists no manifest"))?;
    for _ in 0..4 {
        let is_index =
            desc.media_type.contains("image.index") || desc.media_type.contains("manifest.list");
        if !is_index {
            let m: Manifest = read_json(root, &blob(root, &desc.digest)?)?;
            let layers = m
                .layers
                .iter()
                .map(|l| {
                    Ok(Layer {
                        path: blob(root, &l.digest)?,
                        name: l.digest.clone(),
                    })
                })
                .collect::<Result<_>>()?;
            let config = m.config.and_then(|c| blob(root, &c.digest).ok());
            return Ok(Found { layers, config });
        }
        let nested: Index = read_json(root, &blob(root, &desc.digest)?)?;
        let pick = nested
            .manifests
            .iter()
            .position(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .unwrap_or(0);
        desc = nested
            .manifests
            .into_iter()
            .nth(pick)
            .ok_or_else(|| oci_err(root, "nested index lists no manifest"))?;
    }
    Err(oci_err(root, "indexes nested too deeply"))
}

fn layers_from_docker(root: &Path, reference: Option<&str>) -> Result<Found> {
    let entries: Vec<DockerEntry> = read_json(root, &root.join("manifest.json"))?;
    let entry = match reference {
        Some(r) => entries
            .into_iter()
            .find(|e| {
                e.repo_tags
                    .as_ref()
                    .is_some_and(|t| t.iter().any(|t| t == r))
            })
            .ok_or_else(|| oci_err(root, format!("no image tagged {r:?}")))?,
        None => entries
            .into_iter()
            .next()
            .ok_or_else(|| oci_err(root, "manifest.json lists no image"))?,
    };
    let layers = entry
        .layers
        .iter()
        .map(|l| {
            let path = inside(root, l)?;
            if !path.is_file() {
                return Err(oci_err(root, format!("missing layer {l}")));
            }
            Ok(Layer {
                path,
                name: l.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let config = match &entry.config {
        Some(c) => Some(inside(root, c)?).filter(|p| p.is_file()),
        None => None,
    };
    Ok(Found { layers, config })
}

/// `base/rel` normalized lexically; `None` if it climbs above `base`'s root.
fn join_inside(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    for c in base.components().chain(rel.components()) {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// Why the first 512 bytes of a file are not a tar header, if they are not.
fn not_a_tar(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Some("a gzip-compressed file; decompress it first (gunzip)");
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Some("a zstd-compressed file; decompress it first (unzstd)");
    }
    if head.len() < 512 {
        return Some("shorter than one tar header (512 bytes)");
    }
    // The header checksum: the sum of its bytes with the checksum field taken as spaces,
    // written in octal in that field.
    let field = std::str::from_utf8(&head[148..156]).ok();
    let stored = field
        .map(|f| f.trim_matches(|c: char| c == ' ' || c == '\0'))
        .and_then(|f| u32::from_str_radix(f, 8).ok());
    let sum: u32 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    match stored {
        Some(s) if s == sum => None,
        _ => Some("not a tar archive (its first header's checksum does not match)"),
    }
}

/// Extracts regular files and directories of a tarball into `dest` (never outside it).
fn extract(tarball: &Path, dest: &Path) -> Result<()> {
    let mut f = std::fs::File::open(tarball).map_err(|e| Error::io(tarball, e))?;
    let mut head = Vec::with_capacity(512);
    Read::by_ref(&mut f)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(tarball, e))?;
    if let Some(reason) = not_a_tar(&head) {
        return Err(oci_err(
            tarball,
            format!(
                "{reason}; expected an OCI image layout directory or a tar archive of one (or of `docker save`)"
            ),
        ));
    }
    std::io::Seek::rewind(&mut f).map_err(|e| Error::io(tarball, e))?;
    let mut ar = tar::Archive::new(f);
    // Older `docker save` archives link repeated layers (`a/layer.tar -> ../b/layer.tar`).
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    for entry in ar.entries().map_err(|e| Error::io(tarball, e))? {
        let mut entry = entry.map_err(|e| Error::io(tarball, e))?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let rel = entry
                .path()
                .map_err(|e| Error::io(tarball, e))?
                .into_owned();
            if let Ok(Some(target)) = entry.link_name() {
                let base = if kind.is_symlink() {
                    rel.parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    PathBuf::new()
                };
                if let Some(t) = join_inside(&base, &target) {
                    links.push((rel, t));
                }
            }
            continue;
        }
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let rel = entry
            .path()
            .map_err(|e| Error::io(tarball, e))?
            .into_owned();
        let target = inside(dest, &rel.to_string_lossy())?;
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut out = std::fs::File::create(&target).map_err(|e| Error::io(&target, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&target, e))?;
    }
    for (rel, target) in links {
        let (from, to) = (
            inside(dest, &target.to_string_lossy())?,
            inside(dest, &rel.to_string_lossy())?,
        );
        if from.is_file() {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            std::fs::hard_link(&from, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

/// The layers and config of the image at `src`; a tarball is extracted into `staging` first.
pub fn find_layers(src: &Path, reference: Option<&str>, staging: &Path) -> Result<Found> {
    let md = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    let root = if md.is_dir() {
        src.to_path_buf()
    } else {
        extract(src, staging)?;
        staging.to_path_buf()
    };
    let layers = if root.join("manifest.json").is_file() {
        layers_from_docker(&root, reference)
    } else if root.join("index.json").is_file() {
        layers_from_layout(&root, reference)
    } else {
        Err(oci_err(
            src,
            "neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
        ))
    };
    layers.map_err(|e| match e {
        Error::Oci { reason, .. } => oci_err(src, reason),
        other => other,
    })
}
