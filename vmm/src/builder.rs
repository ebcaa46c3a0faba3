//! Turns a validated spec into a running VM, in one readable sequence: host checks, KVM VM,
//! guest memory, kernel/initrd/boot info, legacy devices (with the serial console's writer
//! thread), virtio devices, vCPUs; and the running VM's end, which writes out buffered console
//! output.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::cpu_template::{CpuConfigError, GuestCpu};
use crate::arch::x86_64::{mptable, regs};
use crate::boot::{self, BootError};
use crate::config::{ImageSettings, SerialOutput, SpecError, VmSpec};
use crate::control::{ControlledDevice, LegacyCounters, VmControl};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::cmos::{Cmos, CMOS_BASE, CMOS_LEN};
use crate::devices::legacy::guest_report::{GuestReport, GUEST_REPORT_BASE, GUEST_REPORT_LEN};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN, KBD_IRQ};
use crate::devices::legacy::serial::{
    LogFile, SerialDevice, SerialOut, SerialWriter, COM1_BASE, COM1_IRQ, COM1_LEN, DRAIN_TIMEOUT,
};
use crate::devices::virtio::block::{BlockDevice, DiskImage};
use crate::devices::virtio::mmio::TransportError;
use crate::devices::virtio::net::{NetDevice, NetError, Tap};
use crate::devices::virtio::rng::RngDevice;
use crate::devices::virtio::vsock::{SocketFile, VsockDevice, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitSignal, VmExit};
use crate::fs_backends::{self, FsBackendError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::run_state::RunState;
use crate::vstate::vcpu::{Buses, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use vm_spec::drive::RNG_DEVICE_ID;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error("{requested} MiB of guest memory is more than this host has ({host} MiB)")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("{requested} vCPUs requested; this host's KVM allows at most {max}")]
    VcpusExceedHost { requested: u32, max: usize },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot write boot structures: {0}")]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up the {what}: {source}")]
    Device {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    FsBackend(#[from] FsBackendError),
    #[error("virtio device: {0}")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::DiskError),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Rng(#[from] crate::devices::virtio::rng::RngError),
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Cpu(#[from] CpuConfigError),
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    pub exit: ExitSignal,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// What the control API and signal handling act on.
    pub control: Arc<VmControl>,
    serial_writer: SerialWriter,
    _memory: GuestMemoryMmap,
    _vm: Vm,
    /// Socket files the devices made (the vsock's listener), removed when the VM ends.
    socket_files: Vec<SocketFile>,
}

impl RunningVm {
    /// Blocks until the VM ends, stops its vCPUs, then writes out the guest's buffered
    /// console output (waiting at most [`DRAIN_TIMEOUT`] for a sink that does not take it).
    pub fn wait(&self) -> VmExit {
        let mut reason = self.exit.wait();
        self.control.stop_vcpus();
        // A reset right after a kernel panic is the panic's restart, not a clean end.
        if matches!(reason, VmExit::GuestReset | VmExit::GuestShutdown) {
            if let Some(why) = self.serial_writer.guest_panic() {
                reason = VmExit::GuestPanic(why);
            }
        }
        if !self.serial_writer.drain(DRAIN_TIMEOUT) {
            tracing::warn!("the guest's last console output could not be written out");
        }
        for file in &self.socket_files {
            if !file.remove() {
                tracing::warn!("cannot remove the socket {}", file.path().display());
            }
        }
        let dropped = self.serial_writer.dropped();
        if dropped > 0 {
            tracing::warn!("{dropped} bytes of guest console output were dropped (sink too slow)");
        }
        reason
    }
}

/// Host memory in MiB, from /proc/meminfo.
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn serial_output(spec: &SerialOutput) -> Result<SerialOut, BuildError> {
    if let Some((path, max_bytes)) = spec.log_file() {
        let file = LogFile::create(path, max_bytes).map_err(|source| BuildError::SerialFile {
            path: path.display().to_string(),
            source,
        })?;
        return Ok(Box::new(file));
    }
    Ok(match spec {
        SerialOutput::Off => Box::new(std::io::sink()),
        _ => Box::new(std::io::stdout()),
    })
}

fn device_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Device { what, source }
}

/// The virtio devices of a VM being built: their MMIO bus, the kernel arguments that announce
/// them, and their control-plane view.
struct VirtioDevices {
    bus: Bus,
    kernel_args: Vec<String>,
    controlled: Vec<ControlledDevice>,
    /// Socket files the devices made (the vsock's listener).
    socket_files: Vec<SocketFile>,
}

/// Creates each virtio device (its threads start now, before any vCPU: a vCPU never creates
/// a thread) and attaches it through the device manager.
fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    spec: &VmSpec,
    images: &ImageSettings,
) -> Result<VirtioDevices, BuildError> {
    let mut manager = DeviceManager::new();
    for share in &spec.fs {
        // One request queue per vCPU: Linux maps each CPU's requests onto its own queue.
        let queues = usize::try_from(spec.vcpus).unwrap_or(1);
        let mut device = fs_backends::device_with_queues(share, images, queues)?;
        device.start_workers().map_err(|e| BuildError::Device {
            what: "virtio device workers",
            source: std::io::Error::other(e.to_string()),
        })?;
        manager.attach_virtio(vm, mem, &share.tag, device)?;
    }
    for drive in &spec.drives {
        let disk = DiskImage::open(&drive.path, drive.readonly)?;
        let device = BlockDevice::new(
            &drive.id,
            disk,
            drive.serial.as_deref(),
            drive.rate_limiter.as_ref(),
        )?;
        attach_started(&mut manager, vm, mem, &drive.id, Box::new(device))?;
    }
    if let Some(rng) = &spec.rng {
        let device = RngDevice::new(rng.rate_limiter.as_ref())?;
        attach_started(&mut manager, vm, mem, RNG_DEVICE_ID, Box::new(device))?;
    }
    let mut socket_files = Vec::new();
    if let Some(vsock) = &spec.vsock {
        let mut device = VsockDevice::new(vsock.guest_cid, &vsock.uds_path)?;
        socket_files.push(device.socket_file());
        device.start_workers().map_err(|e| BuildError::Device {
            what: "vsock worker",
            source: std::io::Error::other(e.to_string()),
        })?;
        manager.attach_virtio(vm, mem, "vsock", Box::new(device))?;
    }
    // Taps are opened now, before any thread is confined; the guest names the interfaces in
    // this order (eth0, eth1, ...).
    for net in &spec.net {
        let opened = match (&net.tap, net.fd) {
            (Some(name), _) => Tap::open(name),
            (None, Some(fd)) => Tap::from_fd(fd),
            (None, None) => Err(crate::devices::virtio::net::TapError::Name(String::new())),
        };
        let tap = opened.map_err(|source| NetError::Tap {
            id: net.id.clone(),
            source,
        })?;
        tracing::info!("net {}: tap {}", net.id, tap.name());
        let device = NetDevice::new(&net.id, Arc::new(tap), net.mac, net.rate_limiter.as_ref())?;
        attach_started(&mut manager, vm, mem, &net.id, Box::new(device))?;
    }
    let kernel_args = manager.kernel_args();
    let (bus, controlled) = manager.into_parts();
    Ok(VirtioDevices {
        bus,
        kernel_args,
        controlled,
        socket_files,
    })
}

/// Starts `device`'s workers and attaches it as `id`.
fn attach_started(
    manager: &mut DeviceManager,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    id: &str,
    mut device: Box<dyn VirtioDevice>,
) -> Result<(), BuildError> {
    device.start_workers().map_err(|e| BuildError::Device {
        what: "virtio device workers",
        source: std::io::Error::other(format!("{id}: {e}")),
    })?;
    manager.attach_virtio(vm, mem, id, device)?;
    Ok(())
}

/// The seccomp filter of the vmm's own threads (see [`crate::seccomp::ThreadKind::Vmm`]).
pub fn vmm_thread_filter() -> Result<Arc<crate::seccomp::ThreadFilter>, BuildError> {
    crate::seccomp::filter(
        crate::seccomp::ThreadKind::Vmm,
        crate::seccomp::Violation::Trap,
    )
    .map(Arc::new)
    .map_err(|e| BuildError::Device {
        what: "vmm thread seccomp filter",
        source: std::io::Error::other(e.to_string()),
    })
}

/// The spec's guest CPU (template, overrides) on this host's KVM, checked before any vCPU.
fn guest_cpu(vm: &Vm, spec: &VmSpec) -> Result<GuestCpu, BuildError> {
    let mut settable_msrs = Vec::new();
    if !spec.cpu.msrs.is_empty() {
        let kvm_err = |what| move |source| BuildError::Kvm { what, source };
        let list = vm
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list its MSRs"))?;
        settable_msrs.extend_from_slice(list.as_slice());
        // Feature MSRs (e.g. IA32_ARCH_CAPABILITIES); older KVMs have no such list.
        if let Ok(features) = vm.kvm.get_msr_feature_index_list() {
            settable_msrs.extend_from_slice(features.as_slice());
        }
    }
    Ok(GuestCpu::new(
        &vm.supported_cpuid,
        &settable_msrs,
        &spec.cpu,
    )?)
}

/// Builds and starts the VM described by `spec`, its images opened with `images` (the node's
/// cache and store policy). `started` is the VMM's start time, against which the guest's
/// "booted" report is measured.
pub fn build(
    spec: &VmSpec,
    images: &ImageSettings,
    kvm_path: &Path,
    started: Instant,
) -> Result<RunningVm, BuildError> {
    spec.validate()?;
    if let Some(host) = host_memory_mib() {
        if spec.memory_mib > host {
            return Err(BuildError::MemoryExceedsHost {
                requested: spec.memory_mib,
                host,
            });
        }
    }

    let vm = Vm::new(kvm_path)?;
    if spec.vcpus as usize > vm.max_vcpus() {
        return Err(BuildError::VcpusExceedHost {
            requested: spec.vcpus,
            max: vm.max_vcpus(),
        });
    }

    let guest_cpu = guest_cpu(&vm, spec)?;

    let guest_memory = memory::create_guest_memory(spec.memory_bytes())?;
    memory::register_with_kvm(&vm.fd, &guest_memory)?;

    let kernel = boot::load_kernel(&guest_memory, &spec.kernel, spec.boot_protocol)?;
    let initrd = match &spec.initrd {
        Some(path) => Some(boot::load_initrd(&guest_memory, path, kernel.end)?),
        None => None,
    };
    let virtio = attach_virtio_devices(&vm, &guest_memory, spec, images)?;
    boot::write_boot_info(
        &guest_memory,
        &kernel,
        &spec.kernel_cmdline(&virtio.kernel_args),
        initrd,
    )?;
    regs::write_boot_tables(&guest_memory, kernel.mode)?;
    mptable::setup_mptable(&guest_memory, spec.vcpus)?;
    tracing::info!(
        "booting {} kernel {} ({:?} entry at {:#x}) with {} vCPUs and {} MiB",
        kernel.format,
        spec.kernel.display(),
        kernel.mode,
        kernel.entry.0,
        spec.vcpus,
        spec.memory_mib
    );

    let exit = ExitSignal::new(started).map_err(device_err("exit event"))?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("serial interrupt"))?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| BuildError::Device {
            what: "serial irqfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let (serial_out, serial_writer) =
        SerialWriter::spawn_confined(serial_output(&spec.serial)?, vmm_thread_filter()?)
            .map_err(device_err("serial writer"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
    let keyboard_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("keyboard interrupt"))?;
    vm.fd
        .register_irqfd(&keyboard_irq, KBD_IRQ)
        .map_err(|e| BuildError::Device {
            what: "keyboard irqfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let keyboard = Arc::new(Mutex::new(
        I8042::new(exit.clone()).with_interrupt(keyboard_irq),
    ));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    pio.insert(keyboard.clone(), I8042_BASE, I8042_LEN)?;
    pio.insert(Arc::new(Mutex::new(Cmos::new())), CMOS_BASE, CMOS_LEN)?;
    pio.insert(
        Arc::new(Mutex::new(GuestReport::new(exit.clone()))),
        GUEST_REPORT_BASE,
        GUEST_REPORT_LEN,
    )?;
    let buses = Buses {
        pio: Arc::new(pio),
        mmio: Arc::new(virtio.bus),
    };

    let vcpus = (0..spec.vcpus)
        .map(|index| {
            let vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&guest_cpu, spec.vcpus, kernel.entry, kernel.mode)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;
    let vcpu_filter = Arc::new(
        crate::seccomp::filter(
            crate::seccomp::ThreadKind::Vcpu,
            crate::seccomp::Violation::Trap,
        )
        .map_err(|e| BuildError::Device {
            what: "vCPU seccomp filter",
            source: std::io::Error::other(e.to_string()),
        })?,
    );
    let run_state = Arc::new(RunState::new(vcpus.len()));
    let vcpu_threads = vcpus
        .into_iter()
        .map(|vcpu| {
            vcpu.start(
                buses.clone(),
                exit.clone(),
                vcpu_filter.clone(),
                run_state.clone(),
            )
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;
    let control = Arc::new(VmControl::new(
        exit.clone(),
        run_state,
        vcpu_threads,
        virtio.controlled,
        keyboard,
        spec.memory_mib,
        Duration::from_secs(u64::from(spec.shutdown_grace_secs)),
        LegacyCounters {
            serial_bytes: serial_writer.guest_bytes(),
        },
    ));

    Ok(RunningVm {
        exit,
        serial,
        control,
        serial_writer,
        _memory: guest_memory,
        _vm: vm,
        socket_files: virtio.socket_files,
    })
}
