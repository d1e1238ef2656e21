//! `decree`: run a coordinator or a participant, run transactions, look inside.
//!
//! Exit codes of the client commands: 0 success (for `txn`: committed),
//! 1 aborted (`txn` only), 2 error or unknown outcome. The command-line
//! contract is in the README; scripts depend on it.

mod alloc;
mod bench;
mod bench_pg;
mod certs;
mod coordinators;
mod demo;
mod failover;
mod ring;
mod scale;
mod soak;
mod txn;

/// mimalloc: glibc's allocator showed as ~12% of the CPU in a profile of the
/// bank benchmark (docs/performance.md); counting when asked (`alloc`).
#[global_allocator]
static ALLOCATOR: alloc::Counting<mimalloc::MiMalloc> = alloc::Counting(mimalloc::MiMalloc);

use clap::{Parser, Subcommand};
use decree_client::Client;
use serde_json::json;

#[derive(Parser)]
#[command(name = "decree", version, about = "decree: a two-phase-commit transaction coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    threads: decree_runtime::args::Threads,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Coordinator(decree_coordinator::Config),
    /// Run the reference KV participant.
    Participant(decree_participant::Config),
    /// Run one transaction of KV operations (applied in the order given).
    Txn(txn::TxnArgs),
    /// Read committed values.
    Get(GetArgs),
    /// The coordinator's outcome of a transaction.
    Status(StatusArgs),
    /// A coordinator group: members, leader, term, log positions and lag; `coordinators add|remove`
    /// change its membership (operator).
    Coordinators(coordinators::CoordinatorsArgs),
    /// The enrolled participants: role, state, share of the keyspace; `participants move` gives a
    /// name to a new address (operator).
    Participants(ParticipantsArgs),
    /// The ring: epoch, members, shares, migration in progress; `ring add|remove|weight` change it (operator).
    Ring(ring::RingArgs),
    /// Branches prepared and undecided at any participant.
    InDoubt(InDoubtArgs),
    /// Redeliver phase two of a committed transaction now (operator).
    Retry(StatusArgs),
    /// Committed branches whose phase two stopped on a refusal retrying cannot mend (operator).
    Stuck(ListArgs),
    /// Decide a branch in doubt by hand when its coordinator is gone (operator; audited).
    Resolve(ResolveArgs),
    /// The heuristic decisions recorded at the participants, and any that the coordinator contradicted.
    Heuristics(InDoubtArgs),
    /// The lock table of every participant: locked keys, holders, waiters, counters.
    Locks(InDoubtArgs),
    /// The operator's console in the browser (cluster, activity, transactions, in doubt, locks,
    /// stuck branches and heuristics; retry and heuristic decisions), as the identity of its
    /// --tls-cert: an observer's console sees, an operator's acts.
    Console(ConsoleArgs),
    /// A local cluster, a bank workload, and a verdict.
    Demo(demo::DemoArgs),
    /// A development CA, certificates for a local cluster's identities, and the policy giving
    /// each its role (mutual TLS: --tls-cert, --tls-key, --tls-ca, --policy).
    Certs(certs::CertsArgs),
    /// Throughput and latency of a local cluster (or --coordinator), beside the floor and, with
    /// --baseline postgres, client-side 2PC over PostgreSQL.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
pub(crate) struct Target {
    #[command(flatten)]
    pub(crate) tls: decree_tls::TlsArgs,
    /// The coordinator's URL; for a coordinator group, its replicas' URLs separated by commas
    /// (requests follow the leader).
    #[arg(long, global = true, env = "DECREE_COORDINATOR", default_value = "http://127.0.0.1:7000")]
    pub(crate) coordinator: String,
    /// Print JSON.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(clap::Args)]
struct ConsoleArgs {
    /// Where to serve the console (HTTP).
    #[arg(long, env = "DECREE_CONSOLE_LISTEN", default_value = "127.0.0.1:7080")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct GetArgs {
    /// Keys to read.
    #[arg(required = true)]
    keys: Vec<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The transaction id, as printed by `decree txn`.
    txid: String,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct InDoubtArgs {
    /// Ask this participant directly (repeatable); for when the coordinator is down.
    #[arg(long, value_name = "URL")]
    participant: Vec<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["commit", "abort"])))]
struct ResolveArgs {
    /// The transaction id, as `decree in-doubt` lists it.
    txid: String,
    /// Commit the branch.
    #[arg(long)]
    commit: bool,
    /// Abort the branch.
    #[arg(long)]
    abort: bool,
    /// Why (kept in the audit record).
    #[arg(long, required = true)]
    reason: String,
    /// Who decides (default: $USER).
    #[arg(long)]
    operator: Option<String>,
    /// The participants to decide at (repeatable).
    #[arg(long, value_name = "URL", required = true)]
    participant: Vec<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct ParticipantsArgs {
    #[command(subcommand)]
    action: Option<ParticipantsAction>,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Subcommand)]
enum ParticipantsAction {
    /// Give a participant's name to a new address, even while the process at the old one runs (its
    /// heartbeats stop counting); recorded and logged. Start the participant there next.
    Move {
        name: String,
        /// The new address, e.g. http://10.0.0.7:7001.
        #[arg(long)]
        address: String,
        /// Why (logged with the move).
        #[arg(long, required = true)]
        reason: String,
        /// Who moves it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    target: Target,
}

/// A client command's failure: printed to stderr, exit 2.
pub(crate) struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(err.to_string())
    }
}

/// A `txn` failure: the message, and the txid when the outcome is unknown.
pub(crate) struct TxnFailure {
    pub(crate) message: String,
    pub(crate) txid: Option<String>,
}

impl From<Failure> for TxnFailure {
    fn from(Failure(message): Failure) -> Self {
        TxnFailure { message, txid: None }
    }
}

impl From<decree_client::ClientError> for TxnFailure {
    fn from(err: decree_client::ClientError) -> Self {
        TxnFailure { txid: err.unknown_txid().map(str::to_owned), message: err.to_string() }
    }
}

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "coordinator" || a == "participant") {
        args = decree_runtime::config_file::apply(args, 2).unwrap_or_else(|err| {
            eprintln!("decree: {err}");
            std::process::exit(2)
        });
    }
    let (cli, matches): (Cli, _) = decree_runtime::args::parse(args);
    alloc::start_from_env();
    let mut threads = cli.threads.clone();
    if let Cmd::Bench(args) = &cli.command {
        // A local cluster's processes share this machine with the bench.
        threads.worker_threads = threads.worker_threads.or_else(|| bench::share_of_cores(args));
    }
    if let Cmd::Demo(args) = &cli.command {
        threads.worker_threads = threads.worker_threads.or_else(|| demo::share_of_cores(args));
    }
    let runtime = match threads.runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("decree: cannot start the runtime: {err}");
            std::process::exit(2);
        }
    };
    if let Some(tls) = cli.command.tls() {
        if let Err(err) = tls.install() {
            eprintln!("decree: {err}");
            std::process::exit(2);
        }
    }
    let code = runtime.block_on(async move {
        match cli.command {
            Cmd::Coordinator(config) => decree_coordinator::run(config).await,
            Cmd::Participant(config) => decree_participant::run(config).await,
            Cmd::Txn(args) => {
                let order = matches.subcommand_matches("txn").map(txn::op_order).unwrap_or_default();
                txn::run(args, order).await
            }
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Certs(args) => report("certs", certs::run(args)),
            Cmd::Bench(args) => bench::run(args).await,
            Cmd::Get(args) => report("get", get(args).await),
            Cmd::Status(args) => report("status", status(args).await),
            Cmd::Participants(args) => report("participants", participants(args).await),
            Cmd::Ring(args) => report("ring", ring::run(args).await),
            Cmd::Coordinators(args) => report("coordinators", coordinators::run(args).await),
            Cmd::Locks(args) => report("locks", locks(args).await),
            Cmd::Retry(args) => report("retry", retry(args).await),
            Cmd::Stuck(args) => report("stuck", stuck(args).await),
            Cmd::Resolve(args) => report("resolve", resolve(args).await),
            Cmd::Heuristics(args) => report("heuristics", heuristics(args).await),
            Cmd::InDoubt(args) => report("in-doubt", in_doubt(args).await),
            Cmd::Console(args) => report("console", console(args).await),
        }
    });
    std::process::exit(code);
}

impl Cmd {
    /// The TLS material a client command speaks with (servers, the demo and
    /// the bench set up their own).
    fn tls(&self) -> Option<&decree_tls::TlsArgs> {
        match self {
            Cmd::Coordinator(_) | Cmd::Participant(_) | Cmd::Demo(_) | Cmd::Bench(_) | Cmd::Certs(_) => None,
            Cmd::Txn(args) => Some(args.tls()),
            Cmd::Get(GetArgs { target, .. })
            | Cmd::Status(StatusArgs { target, .. })
            | Cmd::Retry(StatusArgs { target, .. })
            | Cmd::InDoubt(InDoubtArgs { target, .. })
            | Cmd::Heuristics(InDoubtArgs { target, .. })
            | Cmd::Locks(InDoubtArgs { target, .. })
            | Cmd::Resolve(ResolveArgs { target, .. })
            | Cmd::Participants(ParticipantsArgs { target, .. })
            | Cmd::Stuck(ListArgs { target, .. })
            | Cmd::Console(ConsoleArgs { target, .. }) => Some(&target.tls),
            Cmd::Ring(args) => Some(args.tls()),
            Cmd::Coordinators(args) => Some(args.tls()),
        }
    }
}

fn report(command: &str, result: Result<impl Into<ExitCode>, Failure>) -> i32 {
    match result {
        Ok(code) => code.into().0,
        Err(Failure(message)) => {
            eprintln!("decree {command}: {message}");
            2
        }
    }
}

/// What a client command that succeeded exits with: 0, unless it says otherwise.
struct ExitCode(i32);

impl From<()> for ExitCode {
    fn from((): ()) -> Self {
        ExitCode(0)
    }
}

impl From<i32> for ExitCode {
    fn from(code: i32) -> Self {
        ExitCode(code)
    }
}

async fn get(args: GetArgs) -> Result<(), Failure> {
    let client = Client::connect(&args.target.coordinator).await?;
    let values = client.get(&args.keys).await?;
    if args.target.json {
        let mut object = serde_json::Map::new();
        for key in &args.keys {
            let value = values.get(key).cloned().flatten();
            object.insert(key.clone(), value.map(|v| String::from_utf8_lossy(&v).into_owned()).into());
        }
        println!("{}", serde_json::Value::Object(object));
    } else {
        for key in &args.keys {
            match values.get(key).cloned().flatten() {
                Some(value) => println!("{key}={}", String::from_utf8_lossy(&value)),
                None => println!("{key} (absent)"),
            }
        }
    }
    Ok(())
}

/// `decree status`: exit 0 with the outcome, [`FORGOTTEN_EXIT`] when the
/// coordinator no longer remembers it, 2 on error.
async fn status(args: StatusArgs) -> Result<i32, Failure> {
    args.txid.parse::<decree_client::TxId>()?;
    let client = Client::connect(&args.target.coordinator).await?;
    let outcome = client.status(&args.txid).await?;
    if args.target.json {
        println!("{}", json!({ "txid": args.txid, "outcome": outcome.as_str() }));
    } else if outcome == decree_client::Outcome::Forgotten {
        println!(
            "{} forgotten: older than the coordinator remembers (ended outcomes are kept for \
             --retain-ended / --retain-ended-ms), so it may have committed or aborted",
            args.txid
        );
    } else {
        println!("{} {}", args.txid, outcome.as_str());
    }
    Ok(if outcome == decree_client::Outcome::Forgotten { FORGOTTEN_EXIT } else { 0 })
}

/// `decree status`'s exit code for a forgotten outcome: an answer, but not one
/// a script can act on as committed or aborted.
const FORGOTTEN_EXIT: i32 = 3;

async fn participants(args: ParticipantsArgs) -> Result<(), Failure> {
    let client = Client::connect(&args.target.coordinator).await?;
    if let Some(ParticipantsAction::Move { name, address, reason, operator }) = args.action {
        let operator = operator.unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
        let previous = client.move_participant(&name, &address, &operator, &reason).await?;
        if args.target.json {
            println!("{}", json!({ "name": name, "address": address, "previous": previous }));
        } else {
            println!("{name} moved from {previous} to {address}");
        }
        return Ok(());
    }
    let listed = client.participants().await?;
    if args.target.json {
        let list: Vec<_> = listed
            .iter()
            .map(|p| {
                json!({ "name": p.name, "address": p.address, "state": p.state, "role": p.role,
                        "in_ring": p.in_ring, "share": p.share })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for p in listed {
            let ring =
                if p.in_ring { format!("{:.1}% of keys", p.share * 100.0) } else { "not in the ring".into() };
            let ring = if p.role == "service" { "branches by name".to_owned() } else { ring };
            println!("{}\t{}\t{}\t{}\t{ring}", p.name, p.address, p.state, p.role);
        }
    }
    Ok(())
}

async fn in_doubt(args: InDoubtArgs) -> Result<(), Failure> {
    let (branches, unreachable) = if args.participant.is_empty() {
        let client = Client::connect(&args.target.coordinator).await.map_err(|err| match &err {
            decree_client::ClientError::Status(status) if status.code() == tonic::Code::PermissionDenied => {
                Failure(err.to_string())
            }
            _ => Failure(format!(
                "{err} (while the coordinator is down, ask participants with --participant URL)"
            )),
        })?;
        client.in_doubt().await?
    } else {
        decree_client::in_doubt_at_urls(&args.participant).await?
    };
    if args.target.json {
        let list: Vec<_> = branches
            .iter()
            .map(|b| json!({ "txid": b.txid, "participant": b.participant, "age_ms": b.age_ms, "locked_keys": b.locked_keys }))
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else if branches.is_empty() {
        println!("nothing in doubt");
    } else {
        for b in branches {
            println!("{}\t{}\t{} ms\t{}", b.txid, b.participant, b.age_ms, b.locked_keys.join(","));
        }
    }
    answered_all(&unreachable)
}

async fn locks(args: InDoubtArgs) -> Result<(), Failure> {
    let (tables, unreachable) = if args.participant.is_empty() {
        Client::connect(&args.target.coordinator).await?.locks().await
    } else {
        decree_client::locks_at_urls(&args.participant).await?
    };
    if args.target.json {
        let list: Vec<_> = tables
            .iter()
            .map(|t| {
                let locks: Vec<_> = t
                    .locks
                    .iter()
                    .map(|l| json!({ "key": l.key, "holder": l.holder, "state": l.state, "waiters": l.waiters }))
                    .collect();
                json!({ "participant": t.participant, "locks": locks, "waits": t.waits,
                        "wait_timeouts": t.wait_timeouts, "conflicts": t.conflicts })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for t in &tables {
            println!(
                "{}: {} locked, {} waits, {} wait timeouts, {} conflicts",
                t.participant,
                t.locks.len(),
                t.waits,
                t.wait_timeouts,
                t.conflicts
            );
            for l in &t.locks {
                let waiters = if l.waiters.is_empty() {
                    String::new()
                } else {
                    format!("\twaiters {}", l.waiters.join(","))
                };
                println!("  {}\t{}\t{}{waiters}", l.key, l.holder, l.state);
            }
        }
    }
    answered_all(&unreachable)
}

/// Names the participants that did not answer (stderr); an error if any.
fn answered_all(unreachable: &[String]) -> Result<(), Failure> {
    for name in unreachable {
        eprintln!("decree: participant {name} did not answer");
    }
    if unreachable.is_empty() {
        Ok(())
    } else {
        Err(Failure(format!("{} participant(s) did not answer", unreachable.len())))
    }
}

async fn retry(args: StatusArgs) -> Result<(), Failure> {
    let client = Client::connect(&args.target.coordinator).await?;
    let (participants, outcome) = client.retry(&args.txid).await?;
    if args.target.json {
        println!(
            "{}",
            json!({ "txid": args.txid, "outcome": outcome.as_str(), "redelivered": participants })
        );
    } else if participants.is_empty() {
        println!("{} {}: nothing to redeliver", args.txid, outcome.as_str());
    } else {
        println!("{} {}: redelivered to {}", args.txid, outcome.as_str(), participants.join(", "));
    }
    Ok(())
}

async fn stuck(args: ListArgs) -> Result<(), Failure> {
    let client = Client::connect(&args.target.coordinator).await?;
    let listed = client.stuck().await?;
    if args.target.json {
        let list: Vec<_> = listed
            .iter()
            .map(|b| json!({ "txid": b.txid, "participant": b.participant, "reason": b.reason }))
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for b in listed {
            println!("{}\t{}\t{}", b.txid, b.participant, b.reason);
        }
    }
    Ok(())
}

async fn console(args: ConsoleArgs) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure(format!("--listen {}: {e}", args.listen)))?;
    let at = listener.local_addr().map_err(|e| Failure(e.to_string()))?;
    println!("decree console at http://{at}/ (coordinator {})", args.target.coordinator);
    decree_console::serve(listener, &args.target.coordinator, decree_runtime::serve::shutdown_signal())
        .await
        .map_err(|e| Failure(format!("console: {e}")))
}

async fn resolve(args: ResolveArgs) -> Result<(), Failure> {
    // Refused while the coordinator can answer: it knows (or is still deciding) the outcome.
    let reachable =
        tokio::time::timeout(std::time::Duration::from_secs(3), Client::connect(&args.target.coordinator))
            .await;
    if let Ok(Ok(client)) = reachable {
        let outcome = client.status(&args.txid).await?;
        let why = match outcome {
            decree_client::Outcome::Pending => "is still deciding it".to_owned(),
            known => format!("knows its outcome: {}; the participants learn it themselves", known.as_str()),
        };
        return Err(Failure(format!(
            "refused: the coordinator at {} {why}; a heuristic decision is only for when it is gone",
            args.target.coordinator
        )));
    }
    let operator =
        args.operator.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
    let mut failed = 0;
    for url in &args.participant {
        match decree_client::resolve_at(url, &args.txid, args.commit, &args.reason, &operator).await {
            Ok(()) => println!(
                "{url}: {} {} (recorded)",
                args.txid,
                if args.commit { "committed" } else { "aborted" }
            ),
            Err(err) => {
                failed += 1;
                eprintln!("{url}: {err}");
            }
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure(format!("{failed} participant(s) did not take the decision")))
    }
}

async fn heuristics(args: InDoubtArgs) -> Result<(), Failure> {
    let (lists, unreachable) = if args.participant.is_empty() {
        Client::connect(&args.target.coordinator).await?.heuristics().await
    } else {
        decree_client::heuristics_at_urls(&args.participant).await?
    };
    let outcome = |o: i32| match decree_client::v1::Outcome::try_from(o) {
        Ok(decree_client::v1::Outcome::Committed) => "committed",
        Ok(decree_client::v1::Outcome::Aborted) => "aborted",
        _ => "unknown",
    };
    let rows: Vec<_> = lists
        .iter()
        .flat_map(|list| list.heuristics.iter().map(move |h| (list.participant.as_str(), h)))
        .collect();
    if args.target.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(p, h)| {
                json!({ "participant": p, "txid": h.txid, "decision": if h.commit { "commit" } else { "abort" },
                        "reason": h.reason, "operator": h.operator, "decided_at_unix_ms": h.decided_at_unix_ms,
                        "coordinator_outcome": outcome(h.coordinator_outcome), "contradicted": h.contradicted })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else if rows.is_empty() {
        println!("no heuristic decisions");
    } else {
        for (p, h) in rows {
            let verdict = if h.contradicted { "CONTRADICTED by the coordinator" } else { "" };
            println!(
                "{}\t{p}\t{}\tby {}\tat {} ms\tcoordinator: {}\t{}\t{verdict}",
                h.txid,
                if h.commit { "commit" } else { "abort" },
                h.operator,
                h.decided_at_unix_ms,
                outcome(h.coordinator_outcome),
                h.reason
            );
        }
    }
    answered_all(&unreachable)
}
