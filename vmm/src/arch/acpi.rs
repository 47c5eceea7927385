//! ACPI tables: how the guest finds its CPUs (MADT), its interrupt controllers, and how it
//! powers off and resets (FADT with a PM1a control block and a reset register, and a
//! DSDT carrying `\_S5`). Built with rust-vmm's `acpi_tables`.
//!
//! The DSDT also describes the legacy devices, COM1 (PNP0501) and the i8042 keyboard
//! controller (PNP0303, no mouse), with their ports and IRQs, as PC firmware,
//! Firecracker and QEMU do. Linux then takes them from ACPI instead of probing: without
//! them its 8250 driver (with CONFIG_SERIAL_8250_DETECT_IRQ, as in defconfig) probes
//! COM1's IRQ, two 120 ms sleeps and a stray 0xff byte on the console, and its i8042
//! driver probes for a mouse port.
//!
//! Deliberately *not* hardware-reduced ACPI: in that mode Linux drops the legacy PIC
//! and with it the fixed ISA IRQ numbers that COM1 (IRQ 4) and the command-line
//! `virtio_mmio.device=...:IRQ` devices rely on.
//!
//! The guest kernel finds the RSDP both through boot_params.acpi_rsdp_addr and by its
//! scan of the BIOS area, where it is placed.

use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Method, Name, Notify, Package, Path, ResourceTemplate, Return, IO,
    ZERO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::devices::legacy::i8042::{I8042_COMMAND_PORT, I8042_KBD_IRQ, I8042_PORT};
use crate::devices::legacy::serial::{COM1_PORT, COM_PORT_LEN};

const OEM_ID: [u8; 6] = *b"KINDLG";
const OEM_TABLE_ID: [u8; 8] = *b"KINDLING";
const OEM_REVISION: u32 = 1;
/// \_S5 sleep type; the guest writes (SLP_TYP << 10) | SLP_EN to PM1a_CNT.
pub const S5_SLEEP_TYPE: u16 = 5;
/// PM1 control register bits.
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// Position of the SLP_TYP field (3 bits).
pub const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
/// SLP_EN: enter the sleep state SLP_TYP names.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// IAPC_BOOT_ARCH: legacy ISA devices, 8042 present, no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 5);
/// MADT interrupt source override flags: active high (01), level triggered (11).
const ISO_LEVEL_HIGH: u16 = 0b1101;

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below [`layout::ACPI_END`] (the size they need).
    #[error("ACPI tables do not fit in the BIOS area ({0} bytes)")]
    TooLarge(u64),
    /// Writing the tables into guest memory failed.
    #[error("writing ACPI tables into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Writes RSDP, XSDT, FADT, DSDT and MADT for `vcpus` CPUs; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    // The FACS must be 64-byte aligned.
    let facs_addr = align_to(rsdp_addr + Rsdp::len() as u64, 64);
    let facs_bytes = bytes(&FACS::new());
    let mut next = align(facs_addr + facs_bytes.len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };

    // DSDT: \_S5 so the kernel registers ACPI power-off, and the legacy devices.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_type = S5_SLEEP_TYPE as u8;
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&s5_type, &ZERO]));
    dsdt.append_slice(&bytes(&s5));
    dsdt.append_slice(&legacy_devices());
    dsdt.append_slice(&vmgenid_devices());
    let dsdt_bytes = dsdt.as_slice().to_vec();
    let dsdt_addr = place(dsdt_bytes.len());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let io_reg =
        |port: u16, bits: u8, size: AccessSize| GAS::new(AddressSpace::SystemIo, bits, 0, size, u64::from(port));
    // No SMI command port: the platform is always in ACPI mode (SCI_EN reads as set).
    fadt.sci_int = u16::from(layout::ACPI_SCI_IRQ).into();
    fadt.pm1a_evt_blk = u32::from(layout::ACPI_PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(layout::ACPI_PM1A_CNT_PORT).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.x_pm1a_evt_blk = io_reg(layout::ACPI_PM1A_EVT_PORT, 32, AccessSize::WordAccess);
    fadt.x_pm1a_cnt_blk = io_reg(layout::ACPI_PM1A_CNT_PORT, 16, AccessSize::WordAccess);
    fadt.reset_reg = io_reg(layout::ACPI_RESET_PORT, 8, AccessSize::ByteAccess);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let fadt_bytes = bytes(&fadt.finalize());
    let fadt_addr = place(fadt_bytes.len());

    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(layout::LAPIC_ADDR));
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    let mut madt_bytes = bytes(&madt);
    set_madt_pcat_compat(&mut madt_bytes);
    // The SCI is level-triggered, active high, on its ISA IRQ.
    let sci = layout::ACPI_SCI_IRQ;
    let mut iso = vec![2u8, 10, 0, sci];
    iso.extend_from_slice(&u32::from(sci).to_le_bytes());
    iso.extend_from_slice(&ISO_LEVEL_HIGH.to_le_bytes());
    append_madt_entry(&mut madt_bytes, &iso);
    let madt_addr = place(madt_bytes.len());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = bytes(&xsdt);
    let xsdt_addr = place(xsdt_bytes.len());

    if next > layout::VMGENID_ADDR {
        return Err(AcpiError::TooLarge(next - layout::ACPI_START));
    }
    let rsdp_bytes = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, data) in [
        (rsdp_addr, &rsdp_bytes),
        (facs_addr, &facs_bytes),
        (dsdt_addr, &dsdt_bytes),
        (fadt_addr, &fadt_bytes),
        (madt_addr, &madt_bytes),
        (xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(data, GuestAddress(addr)).map_err(AcpiError::Memory)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// The VM Generation ID device (Microsoft's "Virtual Machine Generation ID" spec, as
/// Linux's vmgenid driver reads it: `ADDR` gives the ID's guest-physical address) and
/// the Generic Event Device whose interrupt makes the guest look at the ID again: its
/// `_EVT` notifies VGEN, and Linux reseeds its random number generator when the ID
/// changed (on every restore from a snapshot).
fn vmgenid_devices() -> Vec<u8> {
    let (lo, hi) = (layout::VMGENID_ADDR as u32, (layout::VMGENID_ADDR >> 32) as u32);
    let addr = Package::new(vec![&lo, &hi]);
    let ret = Return::new(&addr);
    let (hid, cid): (&'static str, &'static str) = ("VMGENCTR", "VM_Gen_Counter");
    let mut v = bytes(&Device::new(
        "_SB_.VGEN".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_CID".into(), &cid),
            &Name::new("_DDN".into(), &cid),
            &Method::new("ADDR".into(), 0, false, vec![&ret]),
        ],
    ));
    let irq = Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = ResourceTemplate::new(vec![&irq]);
    let vgen = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&vgen, &0x80u8);
    let gsi = layout::GED_IRQ;
    let is_ours = Equal::new(&Arg(0), &gsi);
    let when = If::new(&is_ours, vec![&notify]);
    let ged_hid: &'static str = "ACPI0013";
    v.extend(bytes(&Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &ged_hid),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
            &Method::new("_EVT".into(), 1, true, vec![&when]),
        ],
    )));
    v
}

/// COM1 and the keyboard controller as ACPI devices (edge-triggered, active-high ISA
/// interrupts, as the irqfds deliver them).
fn legacy_devices() -> Vec<u8> {
    let port = |p: u64| u16::try_from(p).expect("legacy ports are 16-bit");
    let com1_port = port(COM1_PORT);
    let com1_len = u8::try_from(COM_PORT_LEN).expect("8 registers");
    let com1_irq = Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let com1_io = IO::new(com1_port, com1_port, 1, com1_len);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let (hid, uid) = (EISAName::new("PNP0501"), ZERO);
    let mut v = bytes(&Device::new(
        "_SB_.COM1".into(),
        vec![&Name::new("_HID".into(), &hid), &Name::new("_UID".into(), &uid), &Name::new("_CRS".into(), &com1_crs)],
    ));
    let (data, command) = (port(I8042_PORT), port(I8042_COMMAND_PORT));
    let kbd_data = IO::new(data, data, 1, 1);
    let kbd_command = IO::new(command, command, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_command, &kbd_irq]);
    let hid = EISAName::new("PNP0303");
    v.extend(bytes(&Device::new(
        "_SB_.PS2K".into(),
        vec![&Name::new("_HID".into(), &hid), &Name::new("_CRS".into(), &kbd_crs)],
    )));
    v
}

/// MADT flags bit 0, PCAT_COMPAT: the guest also has (KVM's in-kernel) 8259 PICs. Without
/// it Linux assumes no legacy IRQs, so ISA devices such as COM1 on IRQ 4 are never routed
/// to their IOAPIC pins. `acpi_tables` has no setter for the flags, so the serialized
/// table is patched and its checksum recomputed.
fn set_madt_pcat_compat(madt: &mut [u8]) {
    const FLAGS_OFFSET: usize = 40;
    madt[FLAGS_OFFSET] |= 1;
    fix_checksum(madt);
}

/// Appends an interrupt controller structure the crate has no type for (e.g. an
/// interrupt source override), updating the table length and checksum.
fn append_madt_entry(madt: &mut Vec<u8>, entry: &[u8]) {
    madt.extend_from_slice(entry);
    let len = madt.len() as u32;
    madt[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(madt);
}

fn fix_checksum(table: &mut [u8]) {
    const CHECKSUM_OFFSET: usize = 9;
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum);
}

fn align(addr: u64) -> u64 {
    align_to(addr, 16)
}

fn align_to(addr: u64, to: u64) -> u64 {
    addr.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 4).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(checksum_ok(&mem, rsdp.0, 20) && checksum_ok(&mem, rsdp.0, 36));
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let xsdt_len: u32 = mem.read_obj(GuestAddress(xsdt + 4)).unwrap();
        assert!(checksum_ok(&mem, xsdt, xsdt_len as usize));
        // Second XSDT entry is the MADT: header + 4 LAPICs (8 bytes) + IOAPIC (12) + ISO (10).
        let madt: u64 = mem.read_obj(GuestAddress(xsdt + 36 + 8)).unwrap();
        let mut madt_sig = [0u8; 4];
        mem.read_slice(&mut madt_sig, GuestAddress(madt)).unwrap();
        assert_eq!(&madt_sig, b"APIC");
        let madt_len: u32 = mem.read_obj(GuestAddress(madt + 4)).unwrap();
        assert_eq!(madt_len, 44 + 4 * 8 + 12 + 10);
        assert!(checksum_ok(&mem, madt, madt_len as usize));
        let flags: u32 = mem.read_obj(GuestAddress(madt + 40)).unwrap();
        assert_eq!(flags & 1, 1, "PCAT_COMPAT");
        // The FADT (first XSDT entry) points at the DSDT, which names the legacy devices.
        let fadt: u64 = mem.read_obj(GuestAddress(xsdt + 36)).unwrap();
        let dsdt: u64 = mem.read_obj(GuestAddress(fadt + 140)).unwrap();
        let dsdt_len: u32 = mem.read_obj(GuestAddress(dsdt + 4)).unwrap();
        assert!(checksum_ok(&mem, dsdt, dsdt_len as usize));
        let mut aml = vec![0u8; dsdt_len as usize];
        mem.read_slice(&mut aml, GuestAddress(dsdt)).unwrap();
        let has = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"DSDT") && has(b"_S5_") && has(b"COM1") && has(b"PS2K"));
        // PNP0501 and PNP0303, EISA-compressed.
        assert!(has(&[0x41, 0xd0, 0x05, 0x01]) && has(&[0x41, 0xd0, 0x03, 0x03]));
        // COM1's I/O descriptor: 0x3f8-0x3f8, alignment 1, 8 ports.
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // The VM Generation ID device and the GED that notifies it, on IRQ 3 (edge,
        // active high, exclusive consumer).
        assert!(has(b"VGEN") && has(b"VMGENCTR\0") && has(b"VM_Gen_Counter\0") && has(b"ADDR"));
        assert!(has(b"ACPI0013\0") && has(b"_EVT"));
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x03, 0x00, 0x00, 0x00]));
        // The tables end before the generation ID's page.
        assert!(dsdt + u64::from(dsdt_len) <= layout::VMGENID_ADDR);
    }
}
