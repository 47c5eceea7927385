//! The KVM VM: opening /dev/kvm with actionable errors, guest RAM, in-kernel irqchip + PIT.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout;

/// Where KVM puts the real-mode TSS on Intel (three pages just below the BIOS ROM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the KVM VM could not be created or set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist (or no KVM driver is behind it).
    #[error("/dev/kvm does not exist: this machine has no KVM (enable virtualization in firmware and load kvm_intel or kvm_amd), or use --runner emulated")]
    NoKvm,
    /// The user may not open /dev/kvm.
    #[error("permission denied opening /dev/kvm: add your user to its group (`sudo usermod -aG kvm $USER`, then log in again) or use --runner emulated")]
    KvmPermission,
    /// Opening /dev/kvm failed for another reason.
    #[error("opening /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// KVM's API version is not 12.
    #[error("KVM API version {0} is not 12; this kernel's KVM is unsupported")]
    KvmApi(i32),
    /// KVM lacks a capability kindling needs.
    #[error("KVM lacks {0:?}, which kindling needs (an in-kernel irqchip, irqfd and ioeventfd)")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {err}")]
    Kvm {
        /// The ioctl's name.
        op: &'static str,
        /// Its error.
        err: kvm_ioctls::Error,
    },
    /// Guest RAM could not be allocated.
    #[error("allocating {mib} MiB of guest memory: {err}; lower --memory")]
    Memory {
        /// The size asked for, in MiB.
        mib: u64,
        /// The allocation error, as text.
        err: String,
    },
}

/// A KVM VM and the /dev/kvm handle it was created from.
pub struct Vm {
    /// The /dev/kvm handle, for capability and CPUID queries.
    pub kvm: Kvm,
    /// The VM: memory slots, irqchip, irqfds, ioeventfds and vCPUs are created on it.
    pub fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm, checks its API version and the capabilities kindling needs, and creates a VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm,
            libc::EACCES | libc::EPERM => VmError::KvmPermission,
            _ => VmError::KvmOpen(e),
        })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::KvmApi(api));
        }
        for cap in [Cap::Irqchip, Cap::Irqfd, Cap::Ioeventfd, Cap::UserMemory] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(|err| VmError::Kvm { op: "KVM_CREATE_VM", err })?;
        Ok(Self { kvm, fd })
    }

    /// Allocates guest RAM (anonymous, private) and registers one KVM slot per range.
    pub fn create_memory(&self, mib: u64) -> Result<Arc<GuestMemoryMmap>, VmError> {
        let ranges: Vec<(GuestAddress, usize)> =
            layout::ram_ranges(mib << 20).into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| VmError::Memory { mib, err: e.to_string() })?;
        let mem = Arc::new(mem);
        self.register_memory(&mem)?;
        Ok(mem)
    }

    /// Registers one KVM slot per region of `mem` (fresh, or a snapshot's mapping).
    pub fn register_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping lives in `mem`, which outlives the VM: vCPU threads and
            // devices hold the same Arc, and the VM fd is dropped with them.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|err| VmError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", err })?;
        }
        Ok(())
    }

    /// In-kernel PIC + IOAPIC + LAPICs and the PIT (which Linux calibrates against).
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|err| VmError::Kvm { op: "KVM_SET_TSS_ADDR", err })?;
        self.fd.create_irq_chip().map_err(|err| VmError::Kvm { op: "KVM_CREATE_IRQCHIP", err })?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(|err| VmError::Kvm { op: "KVM_CREATE_PIT2", err })
    }
}
