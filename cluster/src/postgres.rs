//! A throwaway PostgreSQL 15 server for tests: `initdb` in a temporary
//! directory, `pg_ctl start` on an ephemeral port with prepared transactions
//! enabled, stopped (immediate) when dropped.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the
//! `postgres` user (through `runuser`) in a directory that user owns. The
//! binaries are found in `$DECREE_PG_BIN`, on `PATH`, or in
//! `/usr/lib/postgresql/<version>/bin`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{free_port, HarnessError, PortLease, Result};

/// A running PostgreSQL server.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: PortLease,
    as_postgres: bool,
}

fn find_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DECREE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v pg_ctl"]).output() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !path.is_empty() {
            if let Some(dir) = Path::new(&path).parent() {
                return Ok(dir.to_path_buf());
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().ok_or_else(|| {
        HarnessError::Other(
            "PostgreSQL binaries not found: install PostgreSQL 15 or set DECREE_PG_BIN".into(),
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl PgServer {
    /// Initializes and starts a server; returns once it accepts connections.
    pub fn start() -> Result<PgServer> {
        PgServer::start_with(200)
    }

    /// Like [`PgServer::start`], accepting `max_connections` connections
    /// (and as many prepared transactions).
    pub fn start_with(max_connections: usize) -> Result<PgServer> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("decree-pg-").tempdir()?;
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()))?;
        }
        let server = PgServer { dir, bin, port: free_port()?, as_postgres };
        let data = server.data_dir();
        server
            .run_pg("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_prepared_transactions={max_connections} -c max_connections={max_connections}",
            server.port(),
            server.dir.path().display()
        );
        let log = format!("{}/server.log", server.dir.path().display());
        server.run_pg("pg_ctl", &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"])?;
        Ok(server)
    }

    fn data_dir(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn run_pg(&self, tool: &str, args: &[&str]) -> Result<Output> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir(self.dir.path());
        run(&mut command)
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(format!("{}/postmaster.pid", self.data_dir())).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }

    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// The URL of the `postgres` database, for `--pg-url`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port())
    }

    /// Runs `sql` with `psql` and returns its unaligned, tuples-only output, trimmed.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = self.bin.join("psql");
        let psql = if psql.exists() { psql } else { PathBuf::from("psql") };
        let port = self.port().to_string();
        let out = run(Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

fn run(command: &mut Command) -> Result<Output> {
    let out = command.output()?;
    if !out.status.success() {
        return Err(HarnessError::Other(format!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run_pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
