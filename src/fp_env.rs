//! The floating-point environment liblion's arithmetic runs in: IEEE round-to-nearest, with
//! subnormals kept (no flush-to-zero, no denormals-are-zero) and no exception traps.
//!
//! The caller's thread may have another (`torch.set_flush_denormal(True)` sets FTZ and DAZ;
//! `fesetround(FE_UPWARD)` the rounding), and the step's arithmetic would follow it: results
//! would differ from the contract's, from the CUDA engine, and between thread counts (small
//! steps run on the caller's thread, large ones on the pool's, which keep the environment of
//! the thread that made them). So every export runs in the standard environment
//! (`ffi::boundary::guard`), and the caller's is back when it returns; the pool's threads set
//! it as they start. Rust itself assumes this environment, so entering it is also what makes
//! the library's own code well-defined under such a caller.
//!
//! The caller's collective callbacks run in the caller's environment (`as_caller`): its
//! reductions are its own code.
//!
//! x86-64: MXCSR; aarch64: FPCR. Elsewhere nothing is changed (no such target is built).

use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
mod arch {
    use std::arch::asm;

    pub(super) type Control = u32;
    /// Round to nearest, FTZ and DAZ off, every exception masked, no flag raised.
    pub(super) const STANDARD: Control = 0x1F80;
    /// The control bits (rounding, FTZ, DAZ, masks); the low six are sticky status flags.
    pub(super) const CONTROL_BITS: Control = 0xFFC0;

    pub(super) fn get() -> Control {
        let mut value: Control = 0;
        // SAFETY: stores MXCSR into a local.
        unsafe { asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
        value
    }

    /// Not `readonly`: the compiler then takes it for a write to any memory, and moves no load
    /// of the caller's data (nor the arithmetic on it) across the change.
    pub(super) fn set(value: Control) {
        // SAFETY: loads MXCSR from a local whose reserved bits came from `get` or are zero.
        unsafe { asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags)) };
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use std::arch::asm;

    pub(super) type Control = u64;
    /// Round to nearest, FZ, FZ16, DN and AH off, no trap enabled.
    pub(super) const STANDARD: Control = 0;
    /// FPCR holds no status flags (those are FPSR's).
    pub(super) const CONTROL_BITS: Control = !0;

    pub(super) fn get() -> Control {
        let value: Control;
        // SAFETY: reads FPCR.
        unsafe { asm!("mrs {}, fpcr", out(reg) value, options(nomem, nostack, preserves_flags)) };
        value
    }

    /// Not `nomem`, as on x86-64: no load moves across it.
    pub(super) fn set(value: Control) {
        // SAFETY: writes FPCR with a value read from it or the architecture's default.
        unsafe { asm!("msr fpcr, {}", in(reg) value, options(nostack, preserves_flags)) };
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    pub(super) type Control = u32;
    pub(super) const STANDARD: Control = 0;
    pub(super) const CONTROL_BITS: Control = 0;
    pub(super) fn get() -> Control {
        STANDARD
    }
    pub(super) fn set(_: Control) {}
}

/// Whether `value`'s controls (its flags aside) are the standard environment's.
fn is_standard(value: arch::Control) -> bool {
    value & arch::CONTROL_BITS == arch::STANDARD & arch::CONTROL_BITS
}

thread_local! {
    /// The caller's environment while this thread is inside an export that changed it.
    static CALLERS: Cell<Option<arch::Control>> = const { Cell::new(None) };
}

/// The standard environment on this thread until dropped, when the caller's is restored
/// (flags included: liblion's arithmetic raises none in the caller's record). Where the
/// caller's controls are already standard the register is not written, so the common call
/// costs one read of it.
pub(crate) struct Standard {
    /// The caller's environment, where it was not the standard one.
    callers: Option<arch::Control>,
    /// `CALLERS` before this export: an export made from a collective callback restores the
    /// outer export's record.
    outer: Option<arch::Control>,
}

impl Standard {
    pub(crate) fn enter() -> Standard {
        let current = arch::get();
        let callers = (!is_standard(current)).then_some(current);
        if callers.is_some() {
            arch::set(arch::STANDARD);
        }
        let outer = CALLERS.with(|c| c.replace(callers));
        Standard { callers, outer }
    }
}

impl Drop for Standard {
    fn drop(&mut self) {
        CALLERS.with(|c| c.set(self.outer));
        if let Some(callers) = self.callers {
            arch::set(callers);
        }
    }
}

/// Sets the standard environment on this thread for good (the pool's threads, as they start).
pub(crate) fn set_standard() {
    arch::set(arch::STANDARD);
}

/// Runs `f` (the caller's collective) in the caller's environment where an export changed
/// it on this thread, and returns to the standard one after, whatever `f` left (a collective
/// that sets flush-to-zero and keeps it would otherwise change the rest of the step).
pub(crate) fn as_caller<T>(f: impl FnOnce() -> T) -> T {
    if let Some(callers) = CALLERS.with(|c| c.get()) {
        arch::set(callers);
    }
    let out = f();
    if !is_standard(arch::get()) {
        arch::set(arch::STANDARD);
    }
    out
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// Flush-to-zero: MXCSR's FTZ and DAZ, FPCR's FZ.
    #[cfg(target_arch = "x86_64")]
    const FLUSH: arch::Control = arch::STANDARD | 0x8040;
    #[cfg(target_arch = "aarch64")]
    const FLUSH: arch::Control = 1 << 24;

    fn controls() -> arch::Control {
        arch::get() & arch::CONTROL_BITS
    }

    #[test]
    fn a_collective_that_changes_the_environment_leaves_the_step_in_the_standard_one() {
        for caller in [arch::STANDARD, FLUSH] {
            arch::set(caller);
            let seen = {
                let _standard = Standard::enter();
                assert_eq!(controls(), arch::STANDARD & arch::CONTROL_BITS);
                let seen = as_caller(|| {
                    let seen = controls();
                    arch::set(FLUSH); // and keeps it
                    seen
                });
                assert_eq!(
                    controls(),
                    arch::STANDARD & arch::CONTROL_BITS,
                    "caller {caller:#x}"
                );
                seen
            };
            assert_eq!(
                seen,
                caller & arch::CONTROL_BITS,
                "the collective ran in another environment"
            );
            assert_eq!(
                controls(),
                caller & arch::CONTROL_BITS,
                "the caller's was not restored"
            );
            arch::set(arch::STANDARD);
        }
    }
}
