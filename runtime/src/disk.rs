//! Disk space as a state, not a crash.
//!
//! RocksDB that meets a full disk stops accepting writes until it is reopened,
//! and a write that fails poisons our log (the process stops). So a server
//! keeps a **reserve**: a [`DiskGuard`] watches the free space of the file
//! system its data directory is on, and while it is below the reserve the
//! server refuses *new* work at the door (the coordinator new transactions,
//! a participant new Prepares and interactive work, with a message saying
//! how much is free). What was admitted before goes on inside the reserve:
//! commits of prepared branches, aborts, end records, and the pruning and
//! compaction that give space back. When space returns, new work is admitted
//! again, with no restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Free bytes below which new work is refused.
pub const FREE_BYTES: &str = "decree_disk_free_bytes";
/// 1 while free space is below the reserve.
pub const SHORT: &str = "decree_disk_short";

/// How often free space is measured.
const EVERY: Duration = Duration::from_millis(100);

/// The free space of a data directory's file system, against a reserve.
#[derive(Debug)]
pub struct DiskGuard {
    path: PathBuf,
    reserve: u64,
    free: AtomicU64,
    short: AtomicBool,
}

/// Why new work is refused: the disk is short of its reserve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk nearly full: {free_mib} MiB free on the data directory's file system, below the reserve of {reserve_mib} MiB; new work is refused until space returns (--disk-reserve-mb)")]
pub struct DiskShort {
    pub free_mib: u64,
    pub reserve_mib: u64,
}

/// Free bytes for an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the struct we own and reads the NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl DiskGuard {
    /// A guard of `path` keeping `reserve_mib` MiB free, measured once now.
    pub fn new(path: &Path, reserve_mib: u64) -> std::io::Result<Arc<DiskGuard>> {
        let guard = Arc::new(DiskGuard {
            path: path.to_path_buf(),
            reserve: reserve_mib * 1024 * 1024,
            free: AtomicU64::new(0),
            short: AtomicBool::new(false),
        });
        guard.measure()?;
        Ok(guard)
    }

    /// Measures the free space now; logs when the state changes.
    pub fn measure(&self) -> std::io::Result<()> {
        let free = free_bytes(&self.path)?;
        self.free.store(free, Ordering::Relaxed);
        let short = free < self.reserve;
        if self.short.swap(short, Ordering::Relaxed) != short {
            let (free_mib, reserve_mib) = (free >> 20, self.reserve >> 20);
            if short {
                tracing::warn!(
                    free_mib,
                    reserve_mib,
                    "disk nearly full: refusing new work until space returns"
                );
            } else {
                tracing::info!(free_mib, reserve_mib, "disk space is back: admitting new work");
            }
        }
        metrics::gauge!(FREE_BYTES).set(free as f64);
        metrics::gauge!(SHORT).set(if short { 1.0 } else { 0.0 });
        Ok(())
    }

    /// `Err` while free space is below the reserve: refuse new work.
    pub fn admit(&self) -> Result<(), DiskShort> {
        if self.short.load(Ordering::Relaxed) {
            return Err(DiskShort {
                free_mib: self.free.load(Ordering::Relaxed) >> 20,
                reserve_mib: self.reserve >> 20,
            });
        }
        Ok(())
    }

    /// Measures every 100 ms until the last other holder of the guard is gone.
    pub fn watch(self: &Arc<Self>) {
        let guard = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(EVERY);
            loop {
                ticker.tick().await;
                let Some(guard) = guard.upgrade() else { return };
                if let Err(err) = guard.measure() {
                    tracing::warn!(error = %err, path = %guard.path.display(), "cannot measure free disk space");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_and_a_small_one_admits() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let admits = DiskGuard::new(dir.path(), 0).unwrap();
        assert_eq!(admits.admit(), Ok(()));
        let huge = (free >> 20) + 1024 * 1024;
        let refuses = DiskGuard::new(dir.path(), huge).unwrap();
        let err = refuses.admit().unwrap_err();
        assert_eq!(err.reserve_mib, huge);
        assert!(err.to_string().contains("disk nearly full"), "{err}");
    }
}
