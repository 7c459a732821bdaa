//! seccomp filters for the VMM's threads (`--seccomp on|log|off`), built with rust-vmm's
//! seccompiler from the lists in [`allowlists`].
//!
//! When the VM starts (after KVM, RAM and every device are set up) [`Filters::install`]
//! puts the process-wide filter on every thread at once (TSYNC, with `no_new_privs`);
//! threads made later inherit it. vCPU, API and migration threads then add their own
//! narrower filter ([`Filters::narrow`]); filters stack, so a call must pass both.
//!
//! `on`: a call outside the lists traps (SIGSYS); the handler writes which thread made
//! which call and the VMM exits with [`EXIT_CODE`]. `log`: the call is allowed and the
//! kernel logs it (`dmesg`, audit type 1326), to find what a list lacks. `off`: none.

mod allowlists;
pub mod names;

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The VMM's exit code after a forbidden system call.
pub const EXIT_CODE: i32 = 159;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Forbidden calls stop the VMM, naming the thread and the call.
    #[default]
    On,
    /// Forbidden calls are allowed and logged by the kernel (dmesg).
    Log,
    /// No filters.
    Off,
}

/// The kinds of threads with a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU.
    Vcpu,
    /// The control API's threads.
    Api,
    /// A live migration's.
    Migration,
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list names a call this table does not know.
    #[error("seccomp: unknown system call {0:?} in an allow list")]
    UnknownSyscall(&'static str),
    /// seccompiler refused the filter.
    #[error("seccomp: cannot build the {kind} filter: {source}")]
    Build {
        /// Which filter.
        kind: &'static str,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused it.
    #[error("seccomp: cannot install the {kind} filter: {source}")]
    Install {
        /// Which filter.
        kind: &'static str,
        /// Why.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(vmm_sys_util::errno::Error),
}

/// The compiled filters (none for `off`), shared with the threads that narrow theirs.
#[derive(Clone)]
pub struct Filters(Option<Arc<Compiled>>);

struct Compiled {
    vmm: BpfProgram,
    /// Stacked on each narrowed thread's own filter: [`allowlists::REFUSED`] fail with
    /// `EACCES` (the kernel takes the stricter of two filters' answers, so these calls,
    /// which the thread's list lets through, fail rather than trap).
    refused: BpfProgram,
    vcpu: BpfProgram,
    api: BpfProgram,
    migration: BpfProgram,
}

/// A filter that answers the calls in `lists` with `matched` and every other with
/// `mismatch`.
fn compile(
    kind: &'static str,
    lists: &[&[&'static str]],
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut rules = BTreeMap::new();
    for list in lists {
        for &name in *list {
            let nr = names::number(name).ok_or(SeccompError::UnknownSyscall(name))?;
            rules.insert(nr, Vec::new());
        }
    }
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

impl Filters {
    /// Builds the filters of `mode`.
    pub fn new(mode: SeccompMode) -> Result<Filters, SeccompError> {
        use allowlists::*;
        if mode == SeccompMode::Off {
            return Ok(Filters(None));
        }
        // What is not on a list traps (or is logged); the refused calls fail with EACCES
        // (or are logged).
        let (unlisted, refuse) = match mode {
            SeccompMode::Log => (SeccompAction::Log, SeccompAction::Log),
            _ => (
                SeccompAction::Trap,
                SeccompAction::Errno(libc::EACCES as u32),
            ),
        };
        let allow = |kind, lists| compile(kind, lists, unlisted.clone(), SeccompAction::Allow);
        Ok(Filters(Some(Arc::new(Compiled {
            vmm: allow("process", &[COMMON, VMM, VCPU, API, MIGRATION])?,
            refused: compile("refused-calls", &[REFUSED], SeccompAction::Allow, refuse)?,
            vcpu: allow("vCPU", &[COMMON, VCPU, REFUSED])?,
            api: allow("API", &[COMMON, API, REFUSED])?,
            migration: allow("migration", &[COMMON, MIGRATION, REFUSED])?,
        }))))
    }

    /// Installs the process-wide filter on every thread (and the SIGSYS handler).
    pub fn install(&self) -> Result<(), SeccompError> {
        let Some(c) = &self.0 else {
            tracing::warn!(
                "seccomp is off (--seccomp off): the VMM's threads may make any system call"
            );
            return Ok(());
        };
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(SeccompError::Handler)?;
        seccompiler::apply_filter_all_threads(&c.vmm).map_err(|source| SeccompError::Install {
            kind: "process",
            source,
        })?;
        tracing::info!("seccomp filters installed on every thread");
        Ok(())
    }

    /// Narrows the calling thread's filter to its kind's list. A failure is logged: the
    /// thread keeps the process-wide filter.
    pub fn narrow(&self, kind: ThreadKind) {
        let Some(c) = &self.0 else { return };
        let (name, prog) = match kind {
            ThreadKind::Vcpu => ("vCPU", &c.vcpu),
            ThreadKind::Api => ("API", &c.api),
            ThreadKind::Migration => ("migration", &c.migration),
        };
        // The refusing filter first: the narrow one does not allow `seccomp` itself.
        if let Err(e) = seccompiler::apply_filter(&c.refused) {
            tracing::error!("seccomp: cannot install the refused-calls filter on this thread: {e}");
        }
        if let Err(e) = seccompiler::apply_filter(prog) {
            tracing::error!("seccomp: cannot install the {name} filter on this thread: {e}");
        }
    }
}

/// SIGSYS from a trapped call: names the thread and the call on stderr, then exits. Only
/// async-signal-safe calls (prctl, write, exit_group), which every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS. On x86_64 its union starts at
    // byte 16 (si_signo, si_errno, si_code, padding); a seccomp trap's `_sigsys` member
    // there is call_addr (8 bytes), then the call's number (an int) at byte 24.
    let nr = unsafe {
        let base = info as *const u8;
        std::ptr::read_unaligned(base.add(16 + 8) as *const i32)
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    let mut msg = [0u8; 256];
    let mut at = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(msg.len() - at);
        msg[at..at + n].copy_from_slice(&s[..n]);
        at += n;
    };
    put(b"vmm: seccomp: thread '");
    put(&thread[..thread_len]);
    put(b"' made the forbidden system call ");
    match names::name(i64::from(nr)) {
        Some(name) => put(name.as_bytes()),
        None => put(b"?"),
    }
    put(b" (");
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[d..]);
    put(b"); the VMM stops (see --seccomp)\n");
    // SAFETY: writing a stack buffer to stderr and exiting are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), at);
        libc::_exit(EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_call_is_known_and_the_filters_build() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            Filters::new(mode).unwrap();
        }
        assert!(Filters::new(SeccompMode::Off).unwrap().0.is_none());
    }

    /// What glibc's malloc met in an API client thread: `openat` there fails with EACCES
    /// rather than ending the VMM. Only the refusing filter goes on this test thread (the
    /// narrow one would trap whatever the test harness's thread does next).
    #[test]
    fn refused_calls_fail_with_eacces_instead_of_trapping() {
        let filters = Filters::new(SeccompMode::On).unwrap();
        let c = filters.0.clone().unwrap();
        let err = std::thread::spawn(move || {
            seccompiler::apply_filter(&c.refused).unwrap();
            std::fs::File::open("/proc/sys/vm/overcommit_memory").unwrap_err()
        })
        .join()
        .unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    }
}
