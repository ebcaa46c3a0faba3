//! Faults a test forces on one of the vmm's threads, to check how the vmm ends (the exit
//! record of a panic or a seccomp trap on a confined thread: vmm/tests/control_api.rs).
//!
//! Only debug builds have them (`cfg(debug_assertions)`): a release build compiles this to
//! nothing, so neither a guest nor an API client can reach it. In a debug build the variable
//! `VMM_TEST_FAULT=KIND@THREAD[+MS]` makes the thread named THREAD (`vcpu0`, `vmm-ctl`,
//! `serial-out`, `main`, ...), right after it installed its seccomp filter and MS
//! milliseconds later, either panic (KIND `panic`), make a system call no filter allows
//! (KIND `sigsys`), or stop for good (KIND `hang`: a vCPU that never parks, for the control
//! API's answer to a pause that times out).

#[cfg(debug_assertions)]
mod imp {
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Panic,
        Sigsys,
        Hang,
    }

    #[derive(Debug)]
    struct Fault {
        kind: Kind,
        thread: String,
        after: Duration,
    }

    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();

    fn parse(value: &str) -> Option<Fault> {
        let (kind, rest) = value.split_once('@')?;
        let kind = match kind {
            "panic" => Kind::Panic,
            "sigsys" => Kind::Sigsys,
            "hang" => Kind::Hang,
            _ => return None,
        };
        let (thread, after) = match rest.split_once('+') {
            Some((thread, ms)) => (thread, Duration::from_millis(ms.parse().ok()?)),
            None => (rest, Duration::ZERO),
        };
        Some(Fault {
            kind,
            thread: thread.to_string(),
            after,
        })
    }

    pub fn init() {
        let fault = std::env::var("VMM_TEST_FAULT").ok().and_then(|value| {
            let fault = parse(&value);
            if fault.is_none() {
                eprintln!("vmm: warning: VMM_TEST_FAULT={value:?} ignored (KIND@THREAD[+MS])");
            }
            fault
        });
        if let Some(fault) = &fault {
            eprintln!("vmm: warning: test fault {fault:?} armed (debug build)");
        }
        let _ = FAULT.set(fault);
    }

    pub fn after_confinement() {
        let Some(Some(fault)) = FAULT.get() else {
            return;
        };
        if std::thread::current().name() != Some(fault.thread.as_str()) {
            return;
        }
        std::thread::sleep(fault.after);
        match fault.kind {
            Kind::Panic => panic!("test fault on thread {}", fault.thread),
            // SAFETY: bpf(2) with invalid arguments: no thread's filter allows it, so it traps.
            Kind::Sigsys => unsafe {
                libc::syscall(libc::SYS_bpf, -1i64, 0usize, 0usize);
            },
            Kind::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn faults_are_parsed() {
            let f = parse("panic@vcpu0").unwrap();
            assert_eq!(
                (f.kind, f.thread.as_str(), f.after),
                (Kind::Panic, "vcpu0", Duration::ZERO)
            );
            let f = parse("sigsys@vmm-ctl+250").unwrap();
            assert_eq!(
                (f.kind, f.thread.as_str(), f.after),
                (Kind::Sigsys, "vmm-ctl", Duration::from_millis(250))
            );
            assert_eq!(parse("hang@vcpu1").unwrap().kind, Kind::Hang);
            assert!(parse("oops@vcpu0").is_none());
            assert!(parse("panic").is_none());
            assert!(parse("panic@x+y").is_none());
        }
    }
}

/// Reads `VMM_TEST_FAULT` (debug builds only). Call once at start.
pub fn init() {
    #[cfg(debug_assertions)]
    imp::init();
}

/// Raises the armed fault if the calling thread is its target (debug builds only). Called
/// right after a thread installed its seccomp filter.
pub fn after_confinement() {
    #[cfg(debug_assertions)]
    imp::after_confinement();
}
