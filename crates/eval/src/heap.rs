//! Live heap bytes, counted by the process's global allocator: a peak that, unlike the resident set, neither
//! the allocator's caching nor the kernel's page accounting blurs. The `engram` binary wraps its allocator in a
//! counter that reports here; elsewhere nothing reports and [`peak_mb`] is `None`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

/// Called by the allocator after a successful allocation of `bytes`.
pub fn allocated(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
    if !COUNTING.load(Relaxed) {
        COUNTING.store(true, Relaxed);
    }
}

/// Called by the allocator when `bytes` are freed.
pub fn freed(bytes: usize) {
    CURRENT.fetch_sub(bytes, Relaxed);
}

/// Starts a new peak at the bytes live now.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
}

/// The most bytes live at once since the last [`reset_peak`], in MB; `None` when no allocator reports.
pub fn peak_mb() -> Option<f64> {
    COUNTING.load(Relaxed).then(|| PEAK.load(Relaxed) as f64 / (1024.0 * 1024.0))
}

/// Heap bytes live now, in MB; `None` when no allocator reports.
pub fn current_mb() -> Option<f64> {
    COUNTING.load(Relaxed).then(|| CURRENT.load(Relaxed) as f64 / (1024.0 * 1024.0))
}
