//! CPUID for each vCPU: what KVM supports, with the topology of one socket of N
//! single-threaded cores and the vCPU's own APIC ID, so an SMP guest counts N CPUs.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What the host KVM offers beyond KVM_GET_SUPPORTED_CPUID.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCaps {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the LAPIC timer can run in TSC-deadline mode, which
    /// Linux uses without calibrating it against the PIT (slow, and unreliable when the
    /// host is itself emulated).
    pub tsc_deadline: bool,
}

/// Rewrites `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn customize(cpuid: &mut CpuId, index: u8, count: u8, caps: HostCaps) {
    let (apic_id, n) = (u32::from(index), u32::from(count));
    let core_bits = bits_for(n);
    for entry in cpuid.as_mut_slice().iter_mut() {
        patch_entry(entry, apic_id, n, core_bits);
        if entry.function == LEAF_FEATURES && caps.tsc_deadline {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

fn patch_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, n: u32, core_bits: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n & 0xff) << 16);
            e.ecx |= ECX_HYPERVISOR;
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { n - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((n - 1) << 26) | (sharing << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = n;
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_EXT_FEATURES => {
            if n > 1 {
                e.ecx |= AMD_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !AMD_ECX_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((n - 1) & 0xff);
        }
        LEAF_AMD_TOPOLOGY => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff; // one thread per core, core id = apic id
            e.ecx = 0; // node 0
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: 0x21, ebx: 0x0001_0800, ..Default::default() }
    }

    #[test]
    fn topology_of_four_cores() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0x8000_0008, 0)]).unwrap();
        customize(&mut cpuid, 3, 4, HostCaps { tsc_deadline: true });
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processor count");
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 4, 3), "core level: 2 bits, 4 cores, x2APIC id");
        assert_eq!(e[3].ecx & 0xff, 3);
    }

    #[test]
    fn bits() {
        assert_eq!((bits_for(1), bits_for(2), bits_for(3), bits_for(4), bits_for(5)), (0, 1, 2, 2, 3));
    }
}
