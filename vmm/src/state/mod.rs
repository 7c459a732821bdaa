//! The KVM state of a VM, captured and loaded back: one plain serde struct per thing
//! (Firecracker's `persist.rs` style). The migration stream versions them as a whole; these
//! structs carry no version of their own.
//!
//! - [`vcpu::VcpuState`]: one vCPU (registers, special registers, FPU/XSAVE, XCRs, MSRs,
//!   local APIC, MP state, events, debug registers, CPUID, TSC frequency).
//! - [`vm::VmState`]: what KVM holds for the whole VM (PIC master and slave, IOAPIC, PIT,
//!   KVM clock).
//!
//! What KVM cannot give back is the VMM's own set-up, which the destination repeats before
//! restoring: the TSS address (`KVM_SET_TSS_ADDR`, [`vm::TSS_ADDRESS`]), the identity-map
//! address (never set: KVM's default is used, and only Intel VMX without unrestricted guest
//! uses it), the in-kernel irqchip and PIT creation (with `KVM_PIT_SPEAKER_DUMMY`), memory
//! slots, GSI routes, irqfds and ioeventfds.
//!
//! Order on the destination: create the VM as at boot (TSS address, irqchip, PIT2, memory),
//! restore [`vm::VmState`], then create each vCPU and restore its [`vcpu::VcpuState`], then
//! run. On the source: stop every vCPU, call [`vcpu::complete_pending_io`] on each (so that
//! no instruction is left half done), capture every [`vcpu::VcpuState`], then the
//! [`vm::VmState`].

// Used by the snapshot and migration code being written beside this module; until it calls
// these functions, only the tests do.
#![allow(dead_code)]

mod exact;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod tests;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors capturing, restoring, encoding or decoding KVM state. KVM errors name the ioctl
/// and, for per-vCPU ones, the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: {ioctl} failed: {source}")]
    Vcpu {
        /// vCPU id.
        vcpu: u32,
        /// The ioctl, e.g. `KVM_SET_SREGS`.
        ioctl: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("VM: {ioctl} failed: {source}")]
    Vm {
        /// The ioctl, e.g. `KVM_SET_IRQCHIP (IOAPIC)`.
        ioctl: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS stopped at an MSR: KVM here does not accept it, or not with that value.
    #[error(
        "vCPU {vcpu}: KVM_SET_MSRS rejected MSR {index:#x} (value {data:#x}); \
         {set} of {total} MSRs were set"
    )]
    MsrRejected {
        /// vCPU id.
        vcpu: u32,
        /// The MSR KVM stopped at.
        index: u32,
        /// Its saved value.
        data: u64,
        /// How many were set before it.
        set: usize,
        /// How many were to be set.
        total: usize,
    },
    /// A list is longer than KVM takes in one ioctl.
    #[error("vCPU {vcpu}: {what} has {len} entries, more than KVM's limit of {max}")]
    TooMany {
        /// vCPU id.
        vcpu: u32,
        /// `CPUID` or `MSRs`.
        what: &'static str,
        /// Entries in the state.
        len: usize,
        /// KVM's limit.
        max: usize,
    },
    /// The saved XSAVE area holds state for features this host's KVM has no room for.
    #[error(
        "vCPU {vcpu}: the saved XSAVE area has state at byte {offset}, beyond the \
         {size} bytes KVM uses here (a CPU feature the destination lacks)"
    )]
    XsaveTooBig {
        /// vCPU id.
        vcpu: u32,
        /// First non-zero byte beyond `size`.
        offset: usize,
        /// KVM_CAP_XSAVE2 here.
        size: usize,
    },
    /// The saved vCPU used XSAVE state but KVM here has no KVM_SET_XSAVE and the state does
    /// not fit the legacy FPU area.
    #[error("vCPU {vcpu}: KVM here has no XSAVE support; the saved XCR0 {xcr0:#x} needs it")]
    NoXsave {
        /// vCPU id.
        vcpu: u32,
        /// Saved XCR0.
        xcr0: u64,
    },
    /// The TSC frequency differs and KVM here cannot scale it.
    #[error(
        "vCPU {vcpu}: the guest's TSC ran at {saved} kHz, this host's at {here} kHz, \
         and KVM here cannot scale it (no KVM_CAP_TSC_CONTROL)"
    )]
    TscFrequency {
        /// vCPU id.
        vcpu: u32,
        /// Saved frequency.
        saved: u32,
        /// This host's.
        here: u32,
    },
    /// The vCPU has an exit the VMM must handle before its state can be captured.
    #[error("vCPU {vcpu}: an exit is pending ({exit}); handle it and try again")]
    NotQuiescent {
        /// vCPU id.
        vcpu: u32,
        /// The exit, as text.
        exit: String,
    },
    /// Serializing a state failed.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// Which state.
        what: &'static str,
        /// The stream's encoding error.
        source: migration::Error,
    },
    /// Deserializing a state failed (truncated, corrupt, or not this kind of state).
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// Which state.
        what: &'static str,
        /// The stream's decoding error.
        source: migration::Error,
    },
}

/// Encoding of a state struct to and from bytes: the `migration` crate's one encoding for
/// state payloads ([`migration::encode_state`]; the KVM structs inside are byte arrays, as
/// kvm-bindings' serde support writes them).
pub trait StateBytes: Serialize + DeserializeOwned {
    /// Name used in errors, e.g. `vCPU state`.
    const WHAT: &'static str;

    /// Encodes the state.
    fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        migration::encode_state(self).map_err(|source| StateError::Encode {
            what: Self::WHAT,
            source,
        })
    }

    /// Decodes a state written by [`StateBytes::to_bytes`].
    fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        migration::decode_state(bytes).map_err(|source| StateError::Decode {
            what: Self::WHAT,
            source,
        })
    }
}
