//! The state KVM keeps for a VM and its vCPUs, saved for a snapshot and put back on
//! restore: per vCPU its registers, special registers, FPU/XSAVE, XCRs, debug
//! registers, LAPIC, MP state, pending events and MSRs; per VM the PIC pair, the IOAPIC,
//! the PIT and the KVM clock (with the host's wall clock at save time, so that a restore
//! moves the guest's clocks on by the time the snapshot was away). The KVM structures
//! serialize with kvm-bindings' serde support.
//!
//! Order matters on restore, as in Firecracker: CPUID before the registers (it decides
//! which XSAVE state and MSRs exist), special registers before the rest, MSRs after the
//! LAPIC (the TSC deadline MSR is ignored without an enabled LAPIC timer), pending
//! events last.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Why state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{op}: {err}")]
    Kvm {
        /// The ioctl's name.
        op: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// KVM saved or restored fewer MSRs than asked.
    #[error("{op}: KVM took {done} of {wanted} MSRs")]
    Msrs {
        /// The ioctl's name.
        op: &'static str,
        /// How many it took.
        done: usize,
        /// How many there were.
        wanted: usize,
    },
    /// The MSR list could not be built.
    #[error("building the MSR list: {0}")]
    MsrList(String),
    /// Saved state that KVM's own could not have been (it came from a file).
    #[error("{0}")]
    Invalid(String),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |err| StateError::Kvm { op, err }
}

/// One vCPU's KVM state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended (XSAVE) state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted or waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Model-specific registers (the TSC among them).
    pub msrs: Vec<kvm_msr_entry>,
}

/// The MSRs worth saving: every one KVM can save and restore, as KVM lists them.
pub fn saveable_msrs(k: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = k.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// More MSRs than any KVM saves (KVM_GET_MSR_INDEX_LIST has a few hundred).
const MAX_MSRS: usize = 4096;

/// KVM takes MSRs in batches of at most this many.
const MSR_BATCH: usize = 64;

impl VcpuState {
    /// Reads the state of a vCPU that is not running, with the MSRs in `msr_list`
    /// (from [`saveable_msrs`]; those this vCPU cannot read are left out).
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, StateError> {
        // Tell the guest's kvmclock that the vCPU was paused (no soft lockup warnings
        // for the time it stood still). Not every KVM has it: best effort.
        let _ = fd.kvmclock_ctrl();
        let mut msrs = Vec::with_capacity(msr_list.len());
        for batch in msr_list.chunks(MSR_BATCH) {
            let entries: Vec<kvm_msr_entry> =
                batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut m = Msrs::from_entries(&entries).map_err(|e| StateError::MsrList(format!("{e:?}")))?;
            let n = fd.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
            // KVM stops at the first MSR it cannot read; read the rest one by one.
            if n == batch.len() {
                msrs.extend_from_slice(&m.as_slice()[..n]);
            } else {
                for &index in batch {
                    let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                        .map_err(|e| StateError::MsrList(format!("{e:?}")))?;
                    if fd.get_msrs(&mut one).map_err(kvm("KVM_GET_MSRS"))? == 1 {
                        msrs.push(one.as_slice()[0]);
                    }
                }
            }
        }
        Ok(Self {
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs,
        })
    }

    /// Puts the state back into a vCPU whose CPUID is already set.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(StateError::Invalid(format!("{} MSRs, more than the {MAX_MSRS} KVM lists", self.msrs.len())));
        }
        fd.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: the XSAVE area was read from a vCPU of the same CPUID (the snapshot's
        // header is checked against this host before anything is restored), so its
        // layout is the one KVM expects.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        for batch in self.msrs.chunks(MSR_BATCH) {
            let m = Msrs::from_entries(batch).map_err(|e| StateError::MsrList(format!("{e:?}")))?;
            let n = fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
            if n != batch.len() {
                return Err(StateError::Msrs { op: "KVM_SET_MSRS", done: n, wanted: batch.len() });
            }
        }
        fd.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The VM-wide KVM state: the interrupt controllers, the PIT, the KVM clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The PIC pair and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (the guest's monotonic time source).
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are not running.
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = Vec::new();
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            fd.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let mut clock = fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // The clock's value, and the host's wall clock at that moment when KVM gives it
        // (KVM_CLOCK_REALTIME, on a TSC-based host clock): then the restore adds the
        // time the snapshot sat on disk, so the guest's wall clock is right again.
        // The other flags describe how it was read and are not accepted back.
        clock.flags &= KVM_CLOCK_REALTIME;
        Ok(Self { irqchips, pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?, clock })
    }

    /// Puts the state back into a VM that has its irqchip and PIT. With `advance`, the
    /// guest's clocks move on by the time since the snapshot (when the snapshot has the
    /// host's wall clock); otherwise they go on from the snapshot's moment, as if the
    /// guest had not been away.
    pub fn restore(&self, fd: &VmFd, advance: bool) -> Result<(), StateError> {
        let ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        if ids != [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            return Err(StateError::Invalid(format!("interrupt controllers {ids:?}, not the two PICs and the IOAPIC")));
        }
        fd.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        let value_only = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        let clock = if advance { self.clock } else { value_only };
        if let Err(e) = fd.set_clock(&clock) {
            // A host whose clock is not TSC-based (or an older KVM) takes the value only:
            // the guest's clocks then go on from the snapshot's moment.
            if clock.flags & KVM_CLOCK_REALTIME == 0 {
                return Err(StateError::Kvm { op: "KVM_SET_CLOCK", err: e });
            }
            tracing::warn!("KVM_SET_CLOCK with the wall clock: {e}; the guest's clock goes on from the snapshot");
            fd.set_clock(&value_only).map_err(kvm("KVM_SET_CLOCK"))?;
        }
        for chip in &self.irqchips {
            fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
