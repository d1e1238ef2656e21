//! The process's allocator (mimalloc), counting every allocation when
//! `DECREE_COUNT_ALLOCATIONS=1` is set: `decree bench --count-allocations`
//! sets it for each process of its local cluster and reports allocations
//! per committed transaction, read from each process's
//! `decree_allocations_total`. Counting off, an allocation costs one relaxed
//! load more; on, one shared atomic add more (a run that counts is not a
//! run to take tx/s or CPU figures from).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Heap allocations (and reallocations) of this process since counting began.
pub const ALLOCATIONS: &str = "decree_allocations_total";

/// The environment variable that turns counting on.
pub const COUNT_ALLOCATIONS: &str = "DECREE_COUNT_ALLOCATIONS";

/// How often a counting server publishes its count to its metrics page.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

static COUNTING: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);

/// `A`, counting allocations while [`start`] has turned counting on.
pub struct Counting<A>(pub A);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to `A` unchanged; counting touches only atomics and never allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        self.0.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        self.0.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        self.0.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.0.dealloc(ptr, layout)
    }
}

/// Turns counting on.
pub fn start() {
    COUNTING.store(true, Ordering::Relaxed);
}

/// Allocations counted so far (0 while counting is off).
pub fn counted() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

/// With `DECREE_COUNT_ALLOCATIONS=1`: counts from now on, and publishes the
/// count as [`ALLOCATIONS`] every 20 ms (to the metrics page a server
/// installs with `--metrics-listen`; nothing is recorded without one).
pub fn start_from_env() {
    if std::env::var(COUNT_ALLOCATIONS).is_ok_and(|v| v == "1") {
        start();
        let publish = || loop {
            metrics::counter!(ALLOCATIONS).absolute(counted());
            std::thread::sleep(PUBLISH_EVERY);
        };
        if let Err(err) = std::thread::Builder::new().name("allocations".into()).spawn(publish) {
            eprintln!("decree: {COUNT_ALLOCATIONS}: cannot start counting: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_counted_once_counting_is_on() {
        start();
        let before = counted();
        let boxes: Vec<Box<u64>> = (0..100).map(Box::new).collect();
        let after = counted();
        drop(boxes);
        // The Vec's buffer and a hundred boxes, at least (other test threads may add).
        assert!(after - before >= 101, "counted {} allocations for 101", after - before);
    }
}
