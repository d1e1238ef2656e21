//! Ports for the processes a test starts, each leased until its owner is done.
//!
//! A port is chosen by binding it and letting it go, so that the process
//! started next can bind it: between the two, anything else may take it (a
//! node failed its first start with "Address already in use"). What chooses
//! ports in that range: another cluster of the same test binary, at the same
//! moment or while a node of this one is down for a restart, and another
//! process running clusters (`decree bench`, `decree demo`, the Python SDK's
//! tests). So a port is handed out only with a lease: an exclusive lock on a
//! file named after it in a directory every such process of the user shares,
//! held as long as the [`PortLease`] lives (the cluster, the PostgreSQL
//! server, the test). The kernel lets the lock go when its process dies,
//! whatever way it dies.
//!
//! Ports are chosen below Linux's ephemeral range (32768 up), so that no
//! outgoing connection (which takes its local port from that range) or
//! listener on port 0 (a fault proxy's) can take one while its node is down.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;

use crate::Result;

/// Where leased ports are chosen.
const RANGE: std::ops::Range<u32> = 20_000..32_000;

/// A port of 127.0.0.1 no other lease holds, in this process or another,
/// while this lives.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    /// Held (an exclusive `flock`) until dropped; `None` for a port of the
    /// ephemeral range, the last resort when every port of [`RANGE`] is taken.
    _lock: Option<File>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The port number, as in `format!("127.0.0.1:{lease}")`.
impl std::fmt::Display for PortLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.port.fmt(f)
    }
}

/// The directory of the lock files, one per port ever leased (empty files),
/// per user (another user's directory may not be writable).
fn lock_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("decree-ports-{uid}"))
}

/// The lock of `port`, if no lease holds it.
fn lock(port: u16) -> Option<File> {
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(lock_dir().join(port.to_string()));
    let file = file.ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// One free port, leased.
pub fn free_port() -> Result<PortLease> {
    Ok(free_ports(1)?.remove(0))
}

/// `n` distinct free ports, leased. Each is bound while the rest are chosen
/// (and let go before this returns, for its process to bind).
pub fn free_ports(n: usize) -> Result<Vec<PortLease>> {
    std::fs::create_dir_all(lock_dir())?;
    let mut chosen: Vec<(PortLease, TcpListener)> = Vec::with_capacity(n);
    // A start that differs per process and per call: parallel clusters rarely probe the same ports.
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut probe = seed ^ std::process::id().wrapping_mul(2_654_435_761);
    let span = RANGE.end - RANGE.start;
    for _ in 0..span {
        if chosen.len() == n {
            break;
        }
        probe = probe.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = (RANGE.start + (probe >> 8) % span) as u16;
        // The lease first: a port another lease holds may be free only because its node is down.
        let Some(lock) = lock(port) else { continue };
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            chosen.push((PortLease { port, _lock: Some(lock) }, listener));
        }
    }
    while chosen.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        chosen.push((PortLease { port: listener.local_addr()?.port(), _lock: None }, listener));
    }
    Ok(chosen.into_iter().map(|(lease, _)| lease).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leased_port_is_not_handed_out_again_until_its_lease_ends() {
        let held = free_ports(40).unwrap();
        let ports: std::collections::BTreeSet<u16> = held.iter().map(PortLease::port).collect();
        assert_eq!(ports.len(), 40, "distinct");
        assert!(ports.iter().all(|p| RANGE.contains(&u32::from(*p))), "{ports:?}");
        // Nothing listens on them now, yet no other lease gets one: not here, not in another process.
        for port in &ports {
            assert!(TcpListener::bind(("127.0.0.1", *port)).is_ok(), "{port} is free to bind");
            assert!(lock(*port).is_none(), "{port} is leased");
        }
        for _ in 0..20 {
            let more = free_ports(50).unwrap();
            assert!(more.iter().all(|l| !ports.contains(&l.port())), "a leased port handed out twice");
        }
        let first = held[0].port();
        drop(held);
        assert!(lock(first).is_some(), "the lease ends with its holder");
    }
}
