//! Initial vCPU state for the 64-bit Linux boot protocol: a flat GDT, identity-mapped
//! page tables for the first 4 GiB, long mode enabled, FPU/MSR/LAPIC defaults.
//!
//! The MTRRs are left as firmware leaves them on a VM: enabled, default type
//! write-back, no ranges (as Firecracker does). With them disabled, which is the reset
//! state, all memory is uncacheable by the letter of the architecture, and Linux
//! turns PAT off ("MTRRs disabled, skipping PAT initialization too"), losing
//! write-combining mappings.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_NW: u64 = 0x2000_0000;
const X86_CR0_CD: u64 = 0x4000_0000;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_ENABLED_DEFAULT_WB: u64 = (1 << 11) | 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why the boot tables or a vCPU's initial state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT, IDT or page tables could not be written into guest memory.
    #[error("writing boot page tables / GDT into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    /// A KVM ioctl on the vCPU failed.
    #[error("KVM {op} failed: {err}")]
    Kvm {
        /// The ioctl's name.
        op: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// KVM set fewer of the boot MSRs than asked.
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many MSRs KVM set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |err| RegsError::Kvm { op, err }
}

/// A GDT descriptor from its flags (access byte + flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Null, 64-bit code (selector 0x8), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The KVM segment register a GDT entry describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes GDT, an empty IDT and identity page tables (4 GiB, 2 MiB pages) to memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_START + i as u64 * 8)).map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START)).map_err(RegsError::Memory)?;
    mem.write_obj(layout::PDPTE_START | 0x3, GuestAddress(layout::PML4_START)).map_err(RegsError::Memory)?;
    for gib in 0..4u64 {
        let pd = layout::PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(layout::PDPTE_START + gib * 8)).map_err(RegsError::Memory)?;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            mem.write_obj(page | 0x83, GuestAddress(pd + i * 8)).map_err(RegsError::Memory)?;
        }
    }
    Ok(())
}

/// Puts the boot vCPU in 64-bit mode at `entry` with RSI pointing at boot_params.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64, zero_page: u64) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG) & !(X86_CR0_CD | X86_CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// FPU, boot MSRs and LAPIC local interrupts, for every vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLED_DEFAULT_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).expect("11 entries fit KVM_MAX_MSR_ENTRIES");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs { set, wanted: entries.len() });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let set_mode = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trips_through_segments() {
        let code = segment_from_gdt(GDT[1], 1);
        assert_eq!((code.selector, code.l, code.present, code.type_, code.limit), (0x8, 1, 1, 0xb, 0xffff_ffff));
        let data = segment_from_gdt(GDT[2], 2);
        assert_eq!((data.selector, data.db, data.l, data.type_), (0x10, 1, 0, 0x3));
        assert_eq!(segment_from_gdt(GDT[0], 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let last_pd: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START + 3 * 8)).unwrap();
        let last_page: u64 = mem.read_obj(GuestAddress((last_pd & !0xfff) + 511 * 8)).unwrap();
        assert_eq!(last_page, ((4u64 << 30) - (2 << 20)) | 0x83);
    }
}
