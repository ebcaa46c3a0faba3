//! The runtime part of an OCI image config (entrypoint, cmd, env, working dir, user), kept as
//! image tags (`oci.entrypoint`, `oci.cmd`, `oci.env` as JSON arrays; `oci.workdir`,
//! `oci.user` as strings) so whoever runs the image knows how to start it.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<Runtime>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Runtime {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// Tags describing how to run the image whose config blob is `path`.
pub(crate) fn runtime_tags(src: &Path, path: &Path) -> Result<BTreeMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let cfg: ConfigFile = serde_json::from_slice(&bytes).map_err(|e| Error::Oci {
        path: src.to_path_buf(),
        reason: format!("config {}: {e}", path.display()),
    })?;
    let mut tags = BTreeMap::new();
    let Some(rt) = cfg.config else {
        return Ok(tags);
    };
    let list = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_default();
    if let Some(v) = &rt.entrypoint {
        tags.insert("oci.entrypoint".into(), list(v));
    }
    if let Some(v) = &rt.cmd {
        tags.insert("oci.cmd".into(), list(v));
    }
    if let Some(v) = &rt.env {
        tags.insert("oci.env".into(), list(v));
    }
    for (k, v) in [("oci.workdir", rt.working_dir), ("oci.user", rt.user)] {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            tags.insert(k.into(), v);
        }
    }
    Ok(tags)
}
