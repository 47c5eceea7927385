//! Guest physical memory map (x86_64).
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM)
//! 0x0000_0500  GDT, IDT
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  identity page tables (PML4, PDPT, 4 PDs: first 4 GiB with 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM; EBDA / BIOS area reserved up to 1 MiB
//! 0x000e_0000  ACPI tables (RSDP first, found by the kernel's BIOS-area scan)
//! 0x0010_0000  kernel (bzImage protected-mode part / ELF segments), then RAM
//!   ...        initrd at the top of RAM below the 32-bit MMIO gap
//! 0xc000_0000  MMIO gap: virtio-mmio devices, IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000 RAM continues above 4 GiB when the guest has more than 3 GiB
//! ```

/// The boot GDT.
pub const GDT_START: u64 = 0x500;
/// The boot IDT (one empty entry).
pub const IDT_START: u64 = 0x520;
/// boot_params, the "zero page" the kernel reads at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The boot vCPU's initial stack pointer (the stack grows down).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The identity page tables' PML4.
pub const PML4_START: u64 = 0x9000;
/// The identity page tables' PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// The identity page tables' four page directories, one per GiB.
pub const PDE_START: u64 = 0xb000; // four consecutive pages: 0xb000..0xf000
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// End of low RAM; the EBDA and BIOS area, reserved up to 1 MiB, start here.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables, RSDP first, in the BIOS area the kernel scans.
pub const ACPI_START: u64 = 0xe0000;
/// End of the area the ACPI tables must fit in (1 MiB).
pub const ACPI_END: u64 = 0x100000;
/// The VM Generation ID's 16 bytes, in the last page of the (reserved) ACPI area, after
/// the tables; the DSDT's VGEN device gives the guest this address.
pub const VMGENID_ADDR: u64 = ACPI_END - 0x1000;
/// The interrupt of the ACPI Generic Event Device, through which the VMM tells the
/// guest the VM Generation ID changed (an ISA IRQ no other device uses).
pub const GED_IRQ: u32 = 3;
/// 1 MiB: the kernel is loaded here, and RAM continues from here.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO gap: guest RAM stops here (at 3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (4 GiB): RAM beyond the first 3 GiB continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// KVM's in-kernel IOAPIC has 24 pins; 0-15 are ISA IRQs.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the first virtio-mmio device; each further device takes the next one.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// The IOAPIC's last pin, so the highest IRQ a virtio-mmio device can get.
pub const LAST_IRQ: u32 = 23;

/// ACPI fixed hardware I/O ports: PM1a event block (status + enable, 4 bytes),
/// PM1a control block (2 bytes; S5 = power off), and the FADT reset register.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
/// The PM1a control block.
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// The FADT reset register.
pub const ACPI_RESET_PORT: u16 = 0x608;
/// What the guest writes to the reset register to reset the VM.
pub const ACPI_RESET_VALUE: u8 = 0x42;
/// The ACPI system control interrupt (never raised: no ACPI events are generated).
pub const ACPI_SCI_IRQ: u8 = 9;

/// 1 TiB is far beyond what this VMM is meant for and keeps all arithmetic in range.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Guest RAM ranges (start, length) for a guest of `mem_bytes`, skipping the MMIO gap.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

/// Address of the `index`-th virtio-mmio window and its IRQ.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = FIRST_VIRTIO_IRQ + u32::try_from(index).ok()?;
    (irq <= LAST_IRQ).then(|| (VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, irq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn virtio_slots_run_out_at_the_last_ioapic_pin() {
        assert_eq!(virtio_mmio_slot(0), Some((VIRTIO_MMIO_START, 5)));
        assert_eq!(virtio_mmio_slot(18), Some((VIRTIO_MMIO_START + 18 * 0x1000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }
}
