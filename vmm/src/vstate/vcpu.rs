//! A vCPU: its boot configuration (CPUID, MSRs, LAPIC, registers) and the thread that runs it,
//! dispatching I/O exits to the buses, parking when the VM is paused ([`RunState`]), and turning
//! fatal exits into a VM end with a register dump.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::arch::x86_64::cpu_template::{CpuConfigError, GuestCpu};
use crate::arch::x86_64::{cpuid, interrupts, msrs, regs};
use crate::devices::bus::Bus;
use crate::devices::log_limit::debug_limited;
use crate::exit::{ExitSignal, VmExit};
use crate::seccomp::ThreadFilter;
use crate::vstate::run_state::{self, ExitReason, RunState};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM could not {what} for vCPU {index}: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Registers { index: u32, source: regs::RegsError },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Thread { index: u32, source: std::io::Error },
    #[error("vCPU {index}: {source}")]
    Cpu { index: u32, source: CpuConfigError },
}

/// The buses a vCPU dispatches I/O exits to.
#[derive(Clone)]
pub struct Buses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u32) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "create the vCPU",
                source,
            })?;
        Ok(Self { index, fd })
    }

    /// Sets CPUID (the guest CPU's, normalised for this vCPU), MSRs (boot values, then the
    /// guest CPU's overrides), the LAPIC and the entry registers.
    pub fn configure(
        &self,
        cpu: &GuestCpu,
        vcpu_count: u32,
        entry: GuestAddress,
        mode: regs::EntryMode,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm = |what: &'static str| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let cpuid = cpuid::vcpu_cpuid(&cpu.cpuid, index, vcpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        let boot_msrs = msrs::boot_msrs().map_err(|_| VcpuError::Kvm {
            index,
            what: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = self.fd.set_msrs(&boot_msrs).map_err(kvm("set MSRs"))?;
        if set != boot_msrs.as_slice().len() {
            tracing::warn!(
                "vCPU {index}: KVM accepted {set} of {} boot MSRs",
                boot_msrs.as_slice().len()
            );
        }
        cpu.apply_msrs(&self.fd)
            .map_err(|source| VcpuError::Cpu { index, source })?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("read the LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(kvm("set the LAPIC"))?;
        regs::setup_registers(&self.fd, entry, mode)
            .map_err(|source| VcpuError::Registers { index, source })?;
        Ok(())
    }

    /// Runs the vCPU on its own thread until the VM ends (or `state` says it is ending).
    /// The vCPU's thread installs `filter` before its first KVM_RUN.
    pub fn start(
        self,
        buses: Buses,
        exit: ExitSignal,
        filter: Arc<ThreadFilter>,
        state: Arc<RunState>,
    ) -> Result<VcpuThread, VcpuError> {
        let index = self.index;
        // Counted as running before the thread exists, so a pause never misses it.
        state.vcpu_started();
        let thread_state = state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply_to_current_thread(&filter) {
                    exit.end(VmExit::Fault(format!(
                        "vCPU {index}: not running without its seccomp filter: {e}"
                    )));
                } else {
                    self.run(&buses, &exit, &thread_state);
                }
                thread_state.vcpu_ended();
            });
        match spawned {
            Ok(thread) => Ok(VcpuThread { thread }),
            Err(source) => {
                state.vcpu_ended();
                Err(VcpuError::Thread { index, source })
            }
        }
    }

    fn run(mut self, buses: &Buses, exit: &ExitSignal, state: &RunState) {
        run_state::register_kvm_run(self.fd.get_kvm_run());
        let index = self.index as usize;
        let count = |reason: ExitReason| {
            if let Some(counters) = state.exits(index) {
                counters.count(reason);
            }
        };
        loop {
            if !state.checkpoint() {
                break;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    count(ExitReason::IoOut);
                    buses.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    count(ExitReason::IoIn);
                    if !buses.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    count(ExitReason::MmioWrite);
                    buses.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    count(ExitReason::MmioRead);
                    if !buses.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::Hlt) => {
                    count(ExitReason::Hlt);
                    None
                }
                Ok(VcpuExit::Shutdown) => {
                    count(ExitReason::Shutdown);
                    Some(VmExit::Fault(format!(
                        "vCPU {} triple fault (KVM_EXIT_SHUTDOWN)\n{}",
                        self.index,
                        self.register_dump()
                    )))
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    count(ExitReason::SystemEvent);
                    Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestShutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::GuestReset,
                        other => VmExit::Fault(format!(
                            "vCPU {}: guest system event {other} (crash)\n{}",
                            self.index,
                            self.register_dump()
                        )),
                    })
                }
                Ok(VcpuExit::InternalError) => {
                    count(ExitReason::InternalError);
                    // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Some(VmExit::Fault(format!(
                        "vCPU {}: KVM internal error (suberror {suberror}{})\n{}",
                        self.index,
                        if suberror == 1 {
                            ", instruction emulation failed"
                        } else {
                            ""
                        },
                        self.register_dump()
                    )))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    count(ExitReason::FailEntry);
                    Some(VmExit::Fault(format!(
                        "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})\n{}",
                        self.index,
                        self.register_dump()
                    )))
                }
                Ok(other) => {
                    count(ExitReason::Other);
                    debug_limited!("vCPU {}: ignored exit {other:?}", self.index);
                    None
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: clear the flag its handler set, then look at the run state.
                    count(ExitReason::Interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(VmExit::Fault(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            if let Some(reason) = outcome {
                exit.end(reason);
                break;
            }
        }
        run_state::register_kvm_run(std::ptr::null_mut());
    }

    /// General and special registers, for fault reports.
    fn register_dump(&self) -> String {
        let mut out = String::new();
        let (regs, sregs) = (self.fd.get_regs(), self.fd.get_sregs());
        if let (Ok(r), Ok(s)) = (&regs, &sregs) {
            if is_reset_state(r.rip, s.cs.selector, s.cs.base) {
                out.push_str(RESET_STATE_NOTE);
            }
        }
        match regs {
            Ok(r) => out.push_str(&format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            )),
            Err(e) => out.push_str(&format!("  (general registers unavailable: {e})\n")),
        }
        match sregs {
            Ok(s) => out.push_str(&format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#06x} (base {:#x}, l={}, db={}) ss={:#06x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db,
                s.ss.selector, s.idt.base, s.idt.limit, s.gdt.base, s.gdt.limit
            )),
            Err(e) => out.push_str(&format!("  (special registers unavailable: {e})")),
        }
        out
    }
}

/// Said above a register dump that shows a vCPU's reset state. At a shutdown (triple fault)
/// KVM on AMD re-initialises the vCPU (the VMCB is undefined after that intercept), so the
/// registers read afterwards are those of a CPU just out of reset, not the guest's at the fault.
const RESET_STATE_NOTE: &str = "  (these are a vCPU's reset registers: this host's KVM \
    re-initialised the vCPU at the fault, as it does on AMD, so the guest's state at the fault \
    is lost; its console shows how far it got)\n";

/// Whether `rip` and `cs` are those of an x86 CPU just out of reset or INIT (the reset vector
/// 0xffff_fff0: selector 0xf000, base 0xffff_0000, rip 0xfff0).
fn is_reset_state(rip: u64, cs_selector: u16, cs_base: u64) -> bool {
    rip == 0xfff0 && cs_selector == 0xf000 && cs_base == 0xffff_0000
}

/// A started vCPU thread, which the control API kicks out of KVM_RUN.
pub struct VcpuThread {
    thread: JoinHandle<()>,
}

impl VcpuThread {
    /// Sends the kick signal to the thread (see [`run_state`]); harmless once it ended.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread is never joined while this handle lives, so its pthread_t is
        // valid; pthread_kill of a finished (unjoined) thread is harmless.
        unsafe {
            libc::pthread_kill(self.thread.as_pthread_t(), run_state::kick_signal());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_spec::cpu::{CpuSpec, MsrOverride};

    #[test]
    fn a_dump_of_the_reset_vector_is_told_apart() {
        // What an AMD host's KVM leaves after a triple fault (seen in a test-bed run).
        assert!(is_reset_state(0xfff0, 0xf000, 0xffff_0000));
        // A guest in real mode elsewhere, or in long mode at a low address, is not reset.
        assert!(!is_reset_state(0xfff0, 0x0000, 0));
        assert!(!is_reset_state(0x1000, 0xf000, 0xffff_0000));
        assert!(!is_reset_state(0xfff0, 0x10, 0));
    }

    const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
    const MSR_IA32_MCG_CTL: u32 = 0x17b;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

    /// A 64-bit MSR pattern setting bit `bit`, the others kept.
    fn set_bit(bit: u32) -> MsrOverride {
        MsrOverride {
            addr: 0,
            bits: (0..64)
                .map(|i| if 63 - i == bit { '1' } else { 'x' })
                .collect(),
        }
    }

    fn msr(addr: u32, bit: u32) -> MsrOverride {
        MsrOverride {
            addr,
            ..set_bit(bit)
        }
    }

    fn guest_cpu(vm: &Vm, spec: CpuSpec) -> GuestCpu {
        let settable = vm.kvm.get_msr_index_list().unwrap();
        GuestCpu::new(&vm.supported_cpuid, settable.as_slice(), &spec).unwrap()
    }

    fn read_msr(vcpu: &Vcpu, index: u32) -> u64 {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.fd.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    }

    fn configure(vm: &Vm, index: u32, spec: CpuSpec) -> (Vcpu, Result<(), VcpuError>) {
        let vcpu = Vcpu::new(vm, index).unwrap();
        let cpu = guest_cpu(vm, spec);
        let configured = vcpu.configure(
            &cpu,
            4,
            GuestAddress(0x10_0000),
            regs::EntryMode::LinuxLongMode,
        );
        (vcpu, configured)
    }

    /// On this machine's KVM, through the vCPU's real configuration:
    /// - an override KVM takes (IA32_TSC_ADJUST, bit 4) reads back through KVM_GET_MSRS;
    /// - a value KVM refuses (IA32_MCG_CTL enabled: KVM's machine-check capabilities have no
    ///   MCG_CTL_P) fails, naming the MSR and the value;
    /// - a value KVM takes without keeping it (IA32_TSC_DEADLINE before the guest put its
    ///   LAPIC timer in TSC-deadline mode: KVM drops the write) fails, naming what it reads
    ///   back.
    #[test]
    fn msr_overrides_are_applied_on_kvm_and_refused_or_dropped_values_named() {
        if !e2e_tests::kvm_available() {
            return;
        }
        let vm = Vm::new(std::path::Path::new("/dev/kvm")).unwrap();
        let (plain, configured) = configure(&vm, 0, CpuSpec::default());
        configured.unwrap();
        assert_eq!(read_msr(&plain, MSR_IA32_TSC_ADJUST), 0);

        let adjust = CpuSpec {
            msrs: vec![msr(MSR_IA32_TSC_ADJUST, 4)],
            ..Default::default()
        };
        let (vcpu, configured) = configure(&vm, 1, adjust.clone());
        configured.unwrap();
        assert_eq!(read_msr(&vcpu, MSR_IA32_TSC_ADJUST), 16);

        let machine_check = CpuSpec {
            msrs: vec![msr(MSR_IA32_MCG_CTL, 0)],
            ..Default::default()
        };
        let (_, configured) = configure(&vm, 2, machine_check);
        assert_eq!(
            configured.unwrap_err().to_string(),
            "vCPU 2: cpu override of MSR 0x17b: this host's KVM refused the value 0x1 \
             (it sets a bit the host does not support)"
        );

        // IA32_TSC_DEADLINE while the LAPIC timer is not in TSC-deadline mode: KVM ignores
        // the write.
        let deadline = CpuSpec {
            msrs: vec![msr(MSR_IA32_TSC_DEADLINE, 4)],
            ..Default::default()
        };
        let (_, configured) = configure(&vm, 3, deadline);
        assert_eq!(
            configured.unwrap_err().to_string(),
            "vCPU 3: cpu override of MSR 0x6e0: this host's KVM took the value but the MSR \
             reads back 0x0 (bits 0x10 should be 0x10)"
        );
    }
}
