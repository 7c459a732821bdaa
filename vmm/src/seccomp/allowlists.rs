//! The system calls each kind of VMM thread may make once the VM runs.
//!
//! Filters stack: the process-wide [`VMM`] list (installed on every thread at once when
//! the VM starts) is the union of what any thread needs after set-up, and each thread
//! kind narrows it further with its own list. Opening KVM, creating the VM, RAM and the
//! devices happens before any filter is installed.
//!
//! The lists were made by running the whole test suite (every device kind, snapshot,
//! restore, live migration, third-party peers) with `--seccomp log` and reading the
//! kernel's audit records (`dmesg | grep type=1326`), then reading the code paths those
//! tests do not reach (error paths, file creation with links refused).

/// What every thread does: memory, time, signals, futexes, reading and writing the
/// descriptors it was given, thread-local bookkeeping, logging, and the seccomp trap
/// handler's own calls (prctl to name the thread, write, exit_group).
pub const COMMON: &[&str] = &[
    "brk",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "fcntl",
    "fstat",
    "futex",
    "getpid",
    "getrandom",
    "gettid",
    "gettimeofday",
    "lseek",
    "madvise",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "newfstatat",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "pwrite64",
    "read",
    "readv",
    "restart_syscall",
    "rseq",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "set_robust_list",
    "sigaltstack",
    "statx",
    "tgkill",
    "write",
    "writev",
];

/// Calls a narrowed thread (vCPU, API, migration) is refused with `EACCES` instead of
/// being stopped for, because a library makes them behind the thread's back and copes with
/// a refusal: glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time it
/// shrinks a thread arena's heap (`check_may_shrink_heap`), in whichever thread frees
/// memory then (an API client thread did, and the VMM stopped); refused, it leaves the
/// freed pages mapped. The threads themselves open nothing.
pub const REFUSED: &[&str] = &["openat"];

/// A vCPU thread: KVM_RUN and the exits it serves (port and MMIO accesses to the
/// emulated devices, messages to vfio-user servers and mediators' PF sockets, eventfd
/// signals, memory slots changed when a mediator traps or untraps).
pub const VCPU: &[&str] = &["ioctl", "recvfrom", "recvmsg", "sendmsg", "sendto"];

/// The API's threads: accepting clients, reading their credentials, serving each on a
/// thread of its own; requests are answered on the main thread.
pub const API: &[&str] = &[
    "accept4",
    "clone",
    "clone3",
    "geteuid",
    "getsockopt",
    "recvfrom",
    "sendto",
    "setsockopt",
    "shutdown",
];

/// A live migration's thread: its connection, dirty logs and KVM state (ioctl), the
/// devices' migration messages.
pub const MIGRATION: &[&str] = &[
    "connect",
    "getsockopt",
    "ioctl",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socket",
];

/// The union (with [`COMMON`]) of what any thread does after set-up, for every thread:
/// the main thread's event loop, snapshots and API requests (files, sockets, KVM), and the
/// device threads (vfio-user readers, INTx relays), and everything the lists above name.
pub const VMM: &[&str] = &[
    "accept4",
    "bind",
    "chmod",
    "clone",
    "clone3",
    "connect",
    "dup",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "eventfd2",
    "fallocate",
    "fchmod",
    "fchmodat",
    "fdatasync",
    "fsync",
    "ftruncate",
    "getdents64",
    "getcwd",
    "getegid",
    "geteuid",
    "getgid",
    "getpeername",
    "getsockname",
    "getsockopt",
    "getuid",
    "ioctl",
    "listen",
    "openat",
    "pipe2",
    "readlink",
    "readlinkat",
    // A backtrace (RUST_BACKTRACE, anyhow) on an error path reads the binary.
    "access",
    "faccessat",
    "faccessat2",
    "recvfrom",
    "recvmsg",
    "rename",
    "renameat",
    "renameat2",
    // Each vCPU, API and migration thread narrows its own filter.
    "seccomp",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socket",
    "socketpair",
    "unlink",
    "unlinkat",
    "wait4",
];
