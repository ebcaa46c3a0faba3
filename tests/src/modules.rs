//! Kernel modules for the test bed: resolves modules and their dependencies (in load
//! order) from `modules.dep` of an installed kernel, and reads them decompressed
//! (Debian may ship `.ko`, `.ko.xz` or `.ko.zst`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::host;

/// One module to load, in order.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// Module name as the kernel sees it: file stem without `.ko*`, with `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves `wanted` modules (e.g. "kvm_amd") and their dependencies from
/// `<moddir>/modules.dep`, returning them dependencies first.
pub fn resolve(moddir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let dep_file = moddir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_file)
        .map_err(Error::io(format!("reading {}", dep_file.display())))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(module), (module.to_owned(), list));
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            &deps,
            moddir,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    moddir: &Path,
    seen: &mut HashSet<String>,
    order: &mut Vec<Module>,
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let (rel, list) = deps.get(name).ok_or_else(|| Error::Missing {
        what: format!("kernel module {name} in {}", moddir.display()),
        hint: "install the linux-image package of that kernel (e.g. linux-image-cloud-amd64)"
            .into(),
    })?;
    // modules.dep lists the full closure, deepest dependency last: load in reverse.
    for dep in list.iter().rev() {
        visit(dep, deps, moddir, seen, order)?;
    }
    order.push(Module {
        name: name.to_owned(),
        path: moddir.join(rel),
    });
    Ok(())
}

/// The module's ELF bytes, decompressing `.xz`/`.zst`/`.gz` with the host tools.
pub fn read_decompressed(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(Error::io(format!("reading {}", path.display()))),
        Some((tool, package)) => {
            if host::which(tool).is_none() {
                return Err(Error::Missing {
                    what: format!("{tool} (to decompress {})", path.display()),
                    hint: format!("apt-get install {package}"),
                });
            }
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(Error::io(format!("running {tool}")))?;
            if !out.status.success() {
                return Err(Error::BadFile {
                    path: path.to_owned(),
                    problem: format!(
                        "{tool} -dc failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            Ok(out.stdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_in_load_order() {
        let dir = std::env::temp_dir().join(format!("e2e-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let dep = "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
                   kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
                   kernel/virt/lib/irqbypass.ko:\n";
        std::fs::write(dir.join("modules.dep"), dep).ok();
        let names: Vec<String> = resolve(&dir, &["kvm-amd"])
            .map(|v| v.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        assert_eq!(names, ["irqbypass", "kvm", "kvm_amd"]);
        assert!(resolve(&dir, &["nope"]).is_err_and(|e| e.is_missing()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
