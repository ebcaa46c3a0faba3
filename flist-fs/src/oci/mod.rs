//! OCI image import: find the manifest's layers in an OCI image-layout directory or a
//! `docker save` tarball (`source.rs`), apply them in order with whiteouts and opaque
//! directories into one tree while storing file contents as chunks (`apply.rs`), record how to
//! run it (`config.rs`, as tags), and write the image atomically.

mod apply;
mod config;
mod source;

use crate::error::{Error, Result};
use crate::meta::write_image_atomic;
use crate::pack::{PackOptions, PackStats};
use crate::store::Router;
use std::path::Path;
use std::time::Instant;

pub use source::{find_layers, Found, Layer};

/// Imports the OCI image at `src` (layout dir or `docker save` tar) into the image file `out`.
/// `reference` picks an image by ref name / repo tag when the source holds several.
pub fn import(
    src: &Path,
    out: &Path,
    router: &Router,
    opts: &PackOptions,
    reference: Option<&str>,
) -> Result<PackStats> {
    let started = Instant::now();
    if router.is_empty() {
        return Err(Error::BadStoreUrl {
            url: String::new(),
            reason: "no store given".into(),
        });
    }
    let staging = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let found = find_layers(src, reference, staging.path())?;
    let (mut image, mut stats) = apply::apply_layers(src, &found.layers, router, opts)?;
    image.tags = match &found.config {
        Some(c) => config::runtime_tags(src, c)?,
        None => Default::default(),
    };
    image.tags.extend(opts.tags.clone());
    image.routes = router.routes();
    crate::meta::validate(&mut image).map_err(|reason| Error::Oci {
        path: src.to_path_buf(),
        reason,
    })?;
    write_image_atomic(&image, out)?;
    stats.elapsed = started.elapsed();
    Ok(stats)
}
