//! Rate-limited logging of backend failures on the guest's access paths.
//!
//! A dead device makes every guest access fail; logging each one would flood the log from
//! the vCPU threads. [`ErrorLog`] logs the 1st, 2nd, 4th, 8th, ... failure, with the count,
//! so a persistent failure stays visible in O(log n) lines.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A failure counter that logs on powers of two.
#[derive(Debug, Default)]
pub struct ErrorLog {
    count: AtomicU64,
}

impl ErrorLog {
    /// Counts a failure of `what` on device `owner`, logging it if its number is a power of
    /// two.
    pub fn record(&self, owner: &str, what: fmt::Arguments<'_>, err: &dyn fmt::Display) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                "{owner}: {what} failed ({n} failures so far; the guest reads all ones): {err}"
            );
        }
    }

    /// Failures counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
