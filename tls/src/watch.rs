//! Reloading files on SIGHUP and when they change.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How often the files are looked at.
const EVERY: Duration = Duration::from_secs(1);

/// What a file looks like from outside: a change of either means a new file.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Calls `reload` on SIGHUP and whenever one of `paths` changes, for as long
/// as the process runs. A failed reload is logged and counted; whatever was
/// in use stays (a file half written is read again at its next change).
pub(crate) fn spawn(
    what: &'static str,
    paths: Vec<PathBuf>,
    reload: impl Fn() -> Result<String, String> + Send + 'static,
) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = stamp(&paths);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<Option<()>>();
            let cause = tokio::select! {
                _ = signalled => "SIGHUP",
                _ = tick.tick() => {
                    let now = stamp(&paths);
                    if now == seen {
                        continue;
                    }
                    "a file changed"
                }
            };
            seen = stamp(&paths);
            match reload() {
                Ok(described) => {
                    metrics::counter!(crate::RELOADS, "what" => what, "result" => "ok").increment(1);
                    tracing::info!("{what} reloaded ({cause}): {described}");
                }
                Err(err) => {
                    metrics::counter!(crate::RELOADS, "what" => what, "result" => "error").increment(1);
                    tracing::error!("{what} not reloaded ({cause}), the previous one stays in use: {err}");
                }
            }
        }
    });
}
