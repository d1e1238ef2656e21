//! Plumbing the binaries share: logging set-up and shutdown signals.

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// The connections a server accepts on `listener`, with `TCP_NODELAY` set on
/// each: small RPC replies must not wait for Nagle's algorithm (a 40 ms stall
/// against delayed ACKs). A server handed its connections cannot set it itself.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            // Best effort: a socket that refuses still works, just slower.
            let _ = stream.set_nodelay(true);
        })
    })
}

/// Runs a server as a process: checks its configuration, arms the crash
/// points, binds `listen`, and serves until SIGINT or SIGTERM (`serve` gets the
/// listener). Returns the exit code: 0 after a clean stop, 2 for a bad
/// configuration, 1 for anything else. `what` starts every message.
pub async fn run_process<F, Fut, E>(
    what: &str,
    valid: Result<(), String>,
    crash_at: Option<&str>,
    listen: std::net::SocketAddr,
    serve: F,
) -> i32
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(err) = valid {
        eprintln!("{what}: {err}");
        return 2;
    }
    if let Err(err) = crate::crash::arm(crash_at) {
        eprintln!("{what}: {err}");
        return 2;
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("{what}: cannot listen on {listen}: {err}");
            return 1;
        }
    };
    match serve(listener).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("{what}: {err}");
            1
        }
    }
}
