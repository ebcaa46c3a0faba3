//! Capabilities the vmm keeps. Run as root (without the jailer), it needs only what serving
//! host directories to a guest takes: acting as the requesting guest user (SETUID/SETGID for
//! fsuid/fsgid), owning and moding files on its behalf (CHOWN, FOWNER, FSETID, DAC_OVERRIDE,
//! DAC_READ_SEARCH), the overlay's 0:0 whiteouts (MKNOD; the guest's own devices are refused
//! by the share's guard) and, with a writable layer, the layer's `trusted.*` marks (opaque,
//! redirect, origin, device; SYS_ADMIN). Everything else is dropped from every set, the bounding set included, before
//! any thread that touches guest data starts (threads inherit the sets). An unprivileged vmm
//! (jailed) has nothing to drop.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities: {0}")]
pub struct CapsError(String);

/// The capabilities kept; `layers`: a share has a writable layer.
pub fn kept(layers: bool) -> CapsHashSet {
    let mut keep: CapsHashSet = [
        Capability::CAP_CHOWN,
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_DAC_READ_SEARCH,
        Capability::CAP_FOWNER,
        Capability::CAP_FSETID,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_MKNOD,
    ]
    .into_iter()
    .collect();
    if layers {
        keep.insert(Capability::CAP_SYS_ADMIN);
    }
    keep
}

/// Drops every capability but `keep` from the calling thread (and the threads it starts
/// afterwards): bounding, inheritable and ambient sets, then permitted and effective.
pub fn drop_all_but(keep: &CapsHashSet) -> Result<(), CapsError> {
    let err = |e: caps::errors::CapsError| CapsError(e.to_string());
    let permitted = caps::read(None, CapSet::Permitted).map_err(err)?;
    if permitted.is_empty() {
        return Ok(());
    }
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // Dropping from the bounding set needs CAP_SETPCAP, still held here.
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                // A capability this kernel does not know.
                Err(_) if !caps::runtime::thread_all_supported().contains(&cap) => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    let kept: CapsHashSet = permitted.intersection(keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_only_what_it_is_given() {
        if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false) {
            eprintln!("skipped: needs root (CAP_SYS_ADMIN) to have capabilities to drop");
            return;
        }
        // Capabilities are per thread: a thread of its own leaves the test process alone.
        let (effective, bounding) = std::thread::spawn(|| {
            drop_all_but(&kept(false)).unwrap();
            (
                caps::read(None, CapSet::Effective).unwrap(),
                caps::read(None, CapSet::Bounding).unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(effective, kept(false));
        assert!(!effective.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!bounding.contains(&Capability::CAP_NET_ADMIN));
        assert!(!bounding.contains(&Capability::CAP_SYS_MODULE));
        assert!(bounding.contains(&Capability::CAP_CHOWN));
    }
}
