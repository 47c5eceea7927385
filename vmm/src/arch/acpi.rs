//! ACPI tables: how the guest finds its CPUs (MADT), its interrupt controller, and how it
//! powers off and resets (hardware-reduced FADT with sleep-control and reset registers,
//! and a DSDT carrying `\_S5`). Built with rust-vmm's `acpi_tables`.
//!
//! The guest kernel finds the RSDP both through boot_params.acpi_rsdp_addr and by its
//! scan of the BIOS area, where it is placed.

use acpi_tables::aml::{Name, Package, ZERO};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const OEM_ID: [u8; 6] = *b"KINDLG";
const OEM_TABLE_ID: [u8; 8] = *b"KINDLING";
const OEM_REVISION: u32 = 1;
/// \_S5 sleep type; the guest writes (SLP_TYP << 2) | SLP_EN to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the hardware-reduced sleep control register.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// IAPC_BOOT_ARCH: 8042 present, no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 5);

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit in the BIOS area ({0} bytes)")]
    TooLarge(u64),
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
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };

    // DSDT: just \_S5 so the kernel registers ACPI power-off.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE, &ZERO]));
    dsdt.append_slice(&bytes(&s5));
    let dsdt_bytes = dsdt.as_slice().to_vec();
    let dsdt_addr = place(dsdt_bytes.len());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let io_reg = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port));
    fadt.sleep_control_reg = io_reg(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_reg(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_reg(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let fadt_bytes = bytes(&fadt.finalize());
    let fadt_addr = place(fadt_bytes.len());

    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(layout::LAPIC_ADDR));
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    let madt_bytes = bytes(&madt);
    let madt_addr = place(madt_bytes.len());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = bytes(&xsdt);
    let xsdt_addr = place(xsdt_bytes.len());

    if next > layout::ACPI_END {
        return Err(AcpiError::TooLarge(next - layout::ACPI_START));
    }
    let rsdp_bytes = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, data) in [
        (rsdp_addr, &rsdp_bytes),
        (dsdt_addr, &dsdt_bytes),
        (fadt_addr, &fadt_bytes),
        (madt_addr, &madt_bytes),
        (xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(data, GuestAddress(addr)).map_err(AcpiError::Memory)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

fn align(addr: u64) -> u64 {
    (addr + 15) & !15
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
        // Second XSDT entry is the MADT: header + 4 LAPICs (8 bytes) + IOAPIC (12 bytes).
        let madt: u64 = mem.read_obj(GuestAddress(xsdt + 36 + 8)).unwrap();
        let mut madt_sig = [0u8; 4];
        mem.read_slice(&mut madt_sig, GuestAddress(madt)).unwrap();
        assert_eq!(&madt_sig, b"APIC");
        let madt_len: u32 = mem.read_obj(GuestAddress(madt + 4)).unwrap();
        assert_eq!(madt_len, 44 + 4 * 8 + 12);
        assert!(checksum_ok(&mem, madt, madt_len as usize));
    }
}
