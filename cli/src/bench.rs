//! `decree bench`: throughput and latency of a local cluster (or a running
//! one), with the floor measured in the same run, and optionally the same
//! bank workload as client-side 2PC over PostgreSQL, alternating with decree.
//!
//! Reported: committed tx/s, abort rate, p50/p99/p99.9 latency (HDR
//! histogram), fsyncs and gRPC requests per committed transaction (scraped
//! from each process's /metrics), the peak RSS of each process, and the floor
//! `2 x fsync p50 + 2 x round trip`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_client::{kv_payload, v1, Client, KvOp, Outcome};
use decree_cluster::{Cluster, NodeId, Options};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// One key written on each participant: the protocol's own cost.
    Empty,
    /// Transfers `add a=-1, add b=+1` between accounts; the sum is checked at the end.
    Bank,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// Client-side 2PC over N PostgreSQL 15 servers started for the run.
    Postgres,
}

#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = Workload::Bank)]
    pub(crate) workload: Workload,
    /// Participants of the local cluster (and PostgreSQL servers of the baseline).
    #[arg(long, default_value_t = 3)]
    pub(crate) participants: usize,
    /// Replicas of the local coordinator: more than 1 runs a coordinator group, measured
    /// beside a single coordinator (rounds alternate), with the ratio.
    #[arg(long, default_value_t = 1)]
    pub(crate) coordinators: usize,
    /// Then, with a group: kill -9 its leader this many times under the load (restarting it
    /// each time) and report each failover's gap (kill to the next commit) and the
    /// transactions whose clients heard no outcome.
    #[arg(long, default_value_t = 0)]
    pub(crate) kill_leader: usize,
    /// Time between leader kills.
    #[arg(long, default_value = "3s", value_parser = decree_runtime::args::parse_duration)]
    pub(crate) kill_every: Duration,
    /// Closed loop: this many clients, each starting a transaction when its last one ended.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Open loop instead: start this many transactions per second (at most 1000000), whatever the latency.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// How long to measure (after one second of warm-up): `10s`, `500ms`, `2m`; a bare number is seconds.
    #[arg(long, default_value = "10s", value_parser = decree_runtime::args::parse_duration)]
    pub(crate) duration: Duration,
    /// Bank accounts.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) accounts: usize,
    /// Zipf exponent of account choice (e.g. 0.99); uniform if unset.
    #[arg(long)]
    pub(crate) zipf: Option<f64>,
    /// Run against this coordinator instead of starting a cluster (no fsync or RSS figures).
    #[arg(long)]
    pub(crate) coordinator: Option<String>,
    /// Also run the peer system, alternating with decree, and report the ratio.
    #[arg(long, value_enum)]
    pub(crate) baseline: Option<Baseline>,
    /// Rounds of decree (and the baseline, alternating); figures are over all rounds.
    #[arg(long, default_value_t = 1)]
    pub(crate) rounds: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Keep the cluster's directory afterwards.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Run the local cluster over mutual TLS with a role policy (a development CA), measured
    /// beside the same cluster in plaintext (rounds alternate), with the ratio.
    #[arg(long, conflicts_with_all = ["coordinator", "scale_at", "soak", "kill_leader"])]
    pub(crate) tls: bool,
    /// Soak instead: run the load this long (`20m`, `1h`) on a local cluster,
    /// report every --soak-report throughput, p99, RSS and data size of every
    /// process, then kill -9 the coordinator and p1 and time their restarts.
    #[arg(long, value_parser = decree_runtime::args::parse_duration, value_name = "DURATION")]
    pub(crate) soak: Option<Duration>,
    /// How often the soak reports.
    #[arg(long, default_value = "1m", value_parser = decree_runtime::args::parse_duration)]
    pub(crate) soak_report: Duration,
    /// Change the ring this far into the measured run: `5s:add=p4` or `10s:remove=p2`
    /// (repeatable, in order); reports throughput and p99 before, during and after each
    /// migration. A local cluster starts the members to add outside the ring.
    #[arg(long = "scale-at", value_parser = crate::scale::parse, value_name = "SECONDS:add=NAME")]
    pub(crate) scale_at: Vec<crate::scale::ScaleAt>,
    /// Count every heap allocation of each process of the local cluster and of this client
    /// (a counting allocator) and report allocations per committed transaction. Counting
    /// costs CPU: take tx/s and CPU figures from a run without it.
    #[arg(long, conflicts_with = "coordinator")]
    pub(crate) count_allocations: bool,
    /// Extra flags for the local coordinator (repeatable), e.g. --coordinator-flag=--retain-ended=100000.
    #[arg(long = "coordinator-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub(crate) coordinator_flags: Vec<String>,
    /// Extra flags for every local participant (repeatable).
    #[arg(long = "participant-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub(crate) participant_flags: Vec<String>,
}

pub async fn run(args: BenchArgs) -> i32 {
    match bench(args).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("decree bench: {err}");
            2
        }
    }
}

pub(crate) fn account(i: usize) -> String {
    format!("acct-{i:05}")
}

/// Counts kept per process ([`Run::per_process`]), and where allocations are.
const COUNTS: usize = 7;
const ALLOCS: usize = 5;
const LEADER_CHANGES: usize = 6;

/// What one system did in the measured window(s).
#[derive(Default)]
pub(crate) struct Run {
    pub(crate) committed: u64,
    pub(crate) aborted: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latency: Option<Histogram<u64>>,
    pub(crate) fsyncs: Option<f64>,
    pub(crate) rpcs: Option<f64>,
    /// RPCs plus messages on streams.
    pub(crate) messages: Option<f64>,
    pub(crate) rss_mib: BTreeMap<String, f64>,
    /// Per process: fsyncs, log writes, gRPC requests received, stream
    /// messages received, CPU seconds (user + system, from /proc), heap
    /// allocations (0 unless counted), leader changes seen (a group's
    /// replicas).
    pub(crate) per_process: BTreeMap<String, [f64; COUNTS]>,
}

impl Run {
    fn absorb(&mut self, other: Run) {
        self.committed += other.committed;
        self.aborted += other.aborted;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        match (&mut self.latency, other.latency) {
            (Some(mine), Some(theirs)) => mine.add(theirs).expect("same bounds"),
            (mine @ None, theirs) => *mine = theirs,
            _ => {}
        }
        self.fsyncs = sum(self.fsyncs, other.fsyncs);
        self.rpcs = sum(self.rpcs, other.rpcs);
        self.messages = sum(self.messages, other.messages);
        for (name, counts) in other.per_process {
            let mine = self.per_process.entry(name).or_insert([0.0; COUNTS]);
            for i in 0..COUNTS {
                mine[i] += counts[i];
            }
        }
        for (name, mib) in other.rss_mib {
            let peak = self.rss_mib.entry(name).or_insert(0.0);
            *peak = peak.max(mib);
        }
    }

    /// CPU per committed transaction summed over every process measured
    /// (the local cluster's and this client's), in microseconds.
    fn cpu_us_per_tx(&self) -> Option<f64> {
        if self.per_process.is_empty() {
            return None;
        }
        let cpu: f64 = self.per_process.values().map(|counts| counts[4]).sum();
        Some(cpu * 1e6 / self.committed.max(1) as f64)
    }

    /// Heap allocations per committed transaction summed over every
    /// process, if they were counted (`--count-allocations`).
    fn allocations_per_tx(&self) -> Option<f64> {
        let counted: f64 = self.per_process.values().map(|counts| counts[ALLOCS]).sum();
        (counted > 0.0).then(|| counted / self.committed.max(1) as f64)
    }

    /// Leader changes in the measured window(s): the most any replica saw
    /// (0 for a single coordinator; in a group without kills, elections
    /// called because a busy machine delayed the heartbeats).
    fn leader_changes(&self) -> Option<f64> {
        let seen = self.per_process.values().map(|counts| counts[LEADER_CHANGES]);
        (!self.per_process.is_empty()).then(|| seen.fold(0.0, f64::max))
    }

    fn tx_per_s(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.as_ref().map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    }

    fn to_json(&self, floor_ms: f64) -> Value {
        let per_tx = |count: Option<f64>| count.map(|c| c / self.committed.max(1) as f64);
        let total = (self.committed + self.aborted).max(1) as f64;
        json!({
            "tx_per_s": round(self.tx_per_s()),
            "committed": self.committed,
            "aborted": self.aborted,
            "errors": self.errors,
            "abort_rate": round(self.aborted as f64 / total),
            "p50_ms": round(self.percentile_ms(0.5)),
            "p99_ms": round(self.percentile_ms(0.99)),
            "p999_ms": round(self.percentile_ms(0.999)),
            "fsyncs_per_tx": per_tx(self.fsyncs).map(round),
            "rpcs_per_tx": per_tx(self.rpcs).map(round),
            "messages_per_tx": per_tx(self.messages).map(round),
            "floor_ms": round(floor_ms),
            "rss_mib": self.rss_mib.iter().map(|(k, v)| (k.clone(), json!(round(*v)))).collect::<serde_json::Map<_, _>>(),
            "cpu_us_per_tx": self.cpu_us_per_tx().map(round),
            "allocations_per_tx": self.allocations_per_tx().map(|a| a.round()),
            "leader_changes": self.leader_changes(),
            "per_process": self.per_process.iter().map(|(k, [fsyncs, writes, rpcs, streamed, cpu, allocs, _])| {
                let n = self.committed.max(1) as f64;
                (k.clone(), json!({
                    "cpu_us_per_tx": round(cpu * 1e6 / n),
                    "allocations_per_tx": (*allocs > 0.0).then(|| (allocs / n).round()),
                    "fsyncs_per_tx": round(fsyncs / n),
                    "log_writes_per_fsync": round(writes / fsyncs.max(1.0)),
                    "rpcs_received_per_tx": round(rpcs / n),
                    "stream_messages_received_per_tx": round(streamed / n),
                }))
            }).collect::<serde_json::Map<_, _>>(),
        })
    }
}

fn sum(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// The peak resident set of a process, in MiB (VmHWM).
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The CPU time (user + system) process `pid` ("self": this one) has used, in seconds.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Past the command name (which may hold spaces): state is the first field.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second.max(1.0))
}

/// Sums a counter over a Prometheus text page (all label sets).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GET http://addr/metrics.
async fn scrape(addr: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("metrics at {addr}: {e}"))?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await.map_err(|e| e.to_string())?;
    Ok(page)
}

/// The worker threads of each process of a local cluster under load, and of
/// this client: its share of the machine's cores (none given when each may
/// have them all, or when `DECREE_WORKER_THREADS` says). Five processes on
/// two cores with a worker per core each spent 137 µs per transaction, not 113
/// (docs/performance.md).
pub(crate) fn share_of_cores(args: &BenchArgs) -> Option<u16> {
    if args.coordinator.is_some() || std::env::var_os("DECREE_WORKER_THREADS").is_some() {
        return None;
    }
    let processes = args.participants + crate::scale::extra_members(args) + args.coordinators + 1;
    decree_runtime::args::share_of_cores(processes)
}

/// The local cluster and where its metrics are.
pub(crate) struct Local {
    pub(crate) cluster: Cluster,
    pub(crate) metrics: Vec<(String, NodeId, String)>,
    /// The metrics ports, held while the cluster runs.
    _ports: Vec<decree_cluster::PortLease>,
}

impl Local {
    pub(crate) async fn start(args: &BenchArgs) -> Result<Local, String> {
        Local::start_with(args, 1, None).await
    }

    /// A local cluster whose coordinator has `coordinators` replicas, over
    /// mutual TLS with the PKI in `tls` if given.
    pub(crate) async fn start_with(
        args: &BenchArgs,
        coordinators: usize,
        tls: Option<&std::path::Path>,
    ) -> Result<Local, String> {
        let binary = std::env::current_exe().map_err(|e| e.to_string())?;
        // Members that --scale-at adds start outside the ring.
        let extra = crate::scale::extra_members(args);
        let mut options = Options::new(args.participants + extra);
        options.coordinators = coordinators;
        options.join_first = Some(args.participants);
        options.binary = Some(binary);
        options.keep_dir = args.keep;
        options.tls = tls.map(std::path::Path::to_path_buf);
        let ports = decree_cluster::free_ports(args.participants + extra + coordinators)
            .map_err(|e| e.to_string())?;
        let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let mut metrics = Vec::new();
        options.coordinator_args = args.coordinator_flags.clone();
        if coordinators == 1 {
            metrics.push(("coordinator".to_owned(), NodeId::Coordinator, addr(0)));
            options.coordinator_args.extend(["--metrics-listen".into(), addr(0)]);
        }
        for r in (0..coordinators).filter(|_| coordinators > 1) {
            let name = format!("c{}", r + 1);
            options.participant_args_for.push((name.clone(), vec!["--metrics-listen".into(), addr(r)]));
            metrics.push((name, NodeId::Replica(r), addr(r)));
        }
        options.participant_args = args.participant_flags.clone();
        // Each flag goes to the processes whose own flags do not set it.
        let mut pass_on = |flag: [String; 2]| {
            let own = |flags: &[String]| flags.iter().any(|f| f.starts_with(&flag[0]));
            if !own(&args.coordinator_flags) {
                options.coordinator_args.extend(flag.clone());
            }
            if !own(&args.participant_flags) {
                options.participant_args.extend(flag.clone());
            }
        };
        if let Some(n) = share_of_cores(args) {
            pass_on(["--worker-threads".to_owned(), n.to_string()]);
        }
        // The cluster's log writers are scheduled as this command's `--log-writer` says.
        pass_on(decree_runtime::log::writer_policy().flag());
        for i in 1..=args.participants + extra {
            let name = format!("p{i}");
            let at = addr(coordinators - 1 + i);
            options.participant_args_for.push((name.clone(), vec!["--metrics-listen".into(), at.clone()]));
            metrics.push((name, NodeId::Participant(i - 1), at));
        }
        if args.count_allocations {
            crate::alloc::start();
            for (name, _, _) in &metrics {
                let (key, on) = (crate::alloc::COUNT_ALLOCATIONS.to_owned(), "1".to_owned());
                options.env_for.push((name.clone(), key, on));
            }
        }
        let cluster = Cluster::start(options).await.map_err(|e| e.to_string())?;
        Ok(Local { cluster, metrics, _ports: ports })
    }

    /// Per process: the counts of [`Run::per_process`].
    async fn counters(&self) -> Result<BTreeMap<String, [f64; COUNTS]>, String> {
        let mut out = BTreeMap::new();
        let client = cpu_seconds("self").unwrap_or(0.0);
        out.insert("client".to_owned(), [0.0, 0.0, 0.0, 0.0, client, crate::alloc::counted() as f64, 0.0]);
        for (name, id, addr) in &self.metrics {
            let page = match scrape(addr).await {
                Ok(page) => page,
                // A group's replica that is down (killed) has no page.
                Err(_) if matches!(id, NodeId::Replica(_)) => continue,
                Err(err) => return Err(err),
            };
            let counts = [
                counter(&page, decree_runtime::metrics::LOG_FSYNCS),
                counter(&page, decree_runtime::metrics::LOG_WRITES),
                counter(&page, decree_runtime::metrics::GRPC_REQUESTS),
                counter(&page, decree_runtime::metrics::STREAM_MESSAGES),
                self.cluster.pid(*id).and_then(|pid| cpu_seconds(&pid.to_string())).unwrap_or(0.0),
                counter(&page, crate::alloc::ALLOCATIONS),
                counter(&page, decree_coordinator::LEADER_CHANGES),
            ];
            out.insert(name.clone(), counts);
        }
        Ok(out)
    }

    fn rss(&self) -> BTreeMap<String, f64> {
        self.metrics
            .iter()
            .filter_map(|(name, id, _)| Some((name.clone(), peak_rss_mib(self.cluster.pid(*id)?)?)))
            .collect()
    }
}

/// Picks accounts: uniform or Zipf.
#[derive(Clone)]
pub(crate) struct Picker {
    pub(crate) accounts: usize,
    pub(crate) zipf: Option<rand_distr::Zipf<f64>>,
}

impl Picker {
    pub(crate) fn new(accounts: usize, exponent: Option<f64>) -> Result<Picker, String> {
        let zipf = match exponent {
            Some(s) => Some(rand_distr::Zipf::new(accounts as f64, s).map_err(|e| format!("--zipf: {e}"))?),
            None => None,
        };
        Ok(Picker { accounts, zipf })
    }

    fn pick(&self, rng: &mut impl Rng) -> usize {
        match &self.zipf {
            Some(zipf) => (zipf.sample(rng) as usize - 1).min(self.accounts - 1),
            None => rng.random_range(0..self.accounts),
        }
    }

    pub(crate) fn pair(&self, rng: &mut impl Rng) -> (usize, usize) {
        loop {
            let (a, b) = (self.pick(rng), self.pick(rng));
            if a != b {
                return (a, b);
            }
        }
    }
}

/// One transaction's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    Committed,
    Aborted,
    Error,
}

/// Runs `one(worker, seq)` in a closed or open loop for `duration` and records latencies.
pub(crate) async fn drive<F, Fut>(args: &BenchArgs, duration: Duration, bar: &ProgressBar, one: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Done> + Send + 'static,
{
    let one = Arc::new(one);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let started = Instant::now();
    let record = {
        let counts = counts.clone();
        move |done: Done| {
            let slot = match done {
                Done::Committed => 0,
                Done::Aborted => 1,
                Done::Error => 2,
            };
            counts[slot].fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut latency = histogram();
    match args.rate {
        None => {
            let workers: Vec<_> = (0..args.concurrency)
                .map(|worker| {
                    let (one, stop, record, bar) = (one.clone(), stop.clone(), record.clone(), bar.clone());
                    tokio::spawn(async move {
                        let mut latency = histogram();
                        let mut seq = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let begun = Instant::now();
                            let done = one(worker, seq).await;
                            let _ = latency.record(begun.elapsed().as_micros().max(1) as u64);
                            record(done);
                            bar.inc(1);
                            seq += 1;
                        }
                        latency
                    })
                })
                .collect();
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
            for worker in workers {
                if let Ok(h) = worker.await {
                    latency.add(h).expect("same bounds");
                }
            }
        }
        Some(rate) => {
            // Latency counts from when a transaction was due, so a slow system
            // cannot hide its queueing (no coordinated omission). The pacing
            // runs on a thread of its own, asleep until each start: the
            // runtime's timer rounds a sleep up to its next millisecond, and
            // that lateness, up to 1 ms, counted as the system's latency
            // (p50 1.9 ms at 3,000 tx/s where C=1 ran at 0.29 ms).
            let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<u64>();
            let runtime = tokio::runtime::Handle::current();
            let bar = bar.clone();
            let end = started + duration;
            let pacer = std::thread::spawn(move || {
                for (seq, due) in (0u64..).zip(starts(Instant::now(), end, rate)) {
                    if let Some(early) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(early);
                    }
                    let (one, record, bar, sender) =
                        (one.clone(), record.clone(), bar.clone(), sender.clone());
                    runtime.spawn(async move {
                        let done = one((seq % 1024) as usize, seq).await;
                        let _ = sender.send(due.elapsed().as_micros().max(1) as u64);
                        record(done);
                        bar.inc(1);
                    });
                }
                // The run lasts its duration however few transactions it started.
                if let Some(rest) = end.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
            });
            let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
            while let Some(us) = receiver.recv().await {
                let _ = latency.record(us);
            }
        }
    }
    Run {
        committed: counts[0].load(Ordering::Relaxed),
        aborted: counts[1].load(Ordering::Relaxed),
        errors: counts[2].load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency: Some(latency),
        ..Run::default()
    }
}

/// The fastest open loop one client paces: a period of a microsecond, which
/// its pacing thread's sleep cannot hold to anyway (beyond, the period
/// rounds towards zero and the pacer would only spawn).
const MAX_RATE: f64 = 1e6;

/// When an open loop at `rate` per second starts its transactions: from
/// `first`, one each period, every one before `end`. A rate so low that its
/// period overflows starts one; the pacer never sleeps past the run's end.
fn starts(first: Instant, end: Instant, rate: f64) -> impl Iterator<Item = Instant> {
    let period = Duration::try_from_secs_f64(1.0 / rate).ok();
    std::iter::successors(Some(first), move |due| period.and_then(|period| due.checked_add(period)))
        .take_while(move |due| *due < end)
}

/// One decree transaction of the workload.
pub(crate) fn decree_txn(
    client: Client,
    workload: Workload,
    participants: Vec<String>,
    picker: Picker,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>> + Send + Sync {
    move |worker, seq| {
        let (client, participants, picker) = (client.clone(), participants.clone(), picker.clone());
        Box::pin(async move {
            let result = match workload {
                Workload::Empty => {
                    // One key at each participant, one it owns under the ring.
                    let branches = participants
                        .iter()
                        .map(|p| v1::Branch {
                            participant: p.clone(),
                            payload: kv_payload(vec![KvOp::Put {
                                key: client
                                    .key_at(p, &format!("e-{worker}-"))
                                    .unwrap_or(format!("e-{worker}")),
                                value: Vec::new(),
                            }]),
                        })
                        .collect();
                    client.transact_branches(branches).await
                }
                Workload::Bank => {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seq ^ ((worker as u64) << 32));
                    let (a, b) = picker.pair(&mut rng);
                    let ops = vec![
                        KvOp::Add { key: account(a), delta: -1 },
                        KvOp::Add { key: account(b), delta: 1 },
                    ];
                    client.transact(ops).await
                }
            };
            match result {
                Ok(r) if r.outcome == Outcome::Committed => Done::Committed,
                Ok(_) => Done::Aborted,
                Err(_) => Done::Error,
            }
        })
    }
}

/// p50 of `n` timed runs of `f`, in milliseconds.
async fn p50_ms<F, Fut>(n: usize, mut f: F) -> Result<f64, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut h = histogram();
    for _ in 0..n {
        let begun = Instant::now();
        f().await?;
        let _ = h.record(begun.elapsed().as_micros().max(1) as u64);
    }
    Ok(h.value_at_quantile(0.5) as f64 / 1000.0)
}

/// What [`floor`] measured, in ms.
struct Floor {
    fsync_p50: f64,
    /// A lone fsync's tail. (Under several writers at once the device's
    /// tail can be longer: a transaction makes three synced writes in
    /// series, so at C=1 that tail shows in the latency's.)
    fsync_p99: f64,
    rtt_p50: f64,
}

impl Floor {
    /// `2 x fsync p50 + 2 x round trip p50`.
    fn ms(&self) -> f64 {
        2.0 * self.fsync_p50 + 2.0 * self.rtt_p50
    }

    /// A coordinator group's, `2F + 3R`: a decision is durable once a
    /// follower's fsync has answered, one round trip more.
    fn group_ms(&self) -> f64 {
        2.0 * self.fsync_p50 + 3.0 * self.rtt_p50
    }
}

/// The floor, measured now: fsyncs of a 4 KiB write in `dir` (1,000, or as
/// many as take a second, at least 200), round trips of a small gRPC call to
/// the coordinator.
async fn floor(dir: &std::path::Path, client: &Client) -> Result<Floor, String> {
    let path = dir.join("fsync-probe");
    let (fsync_p50, fsync_p99) = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let mut h = histogram();
        let started = Instant::now();
        for i in 0..1000 {
            if i >= 200 && started.elapsed() > Duration::from_secs(1) {
                break;
            }
            let begun = Instant::now();
            file.write_all(&[0u8; 4096]).map_err(|e| e.to_string())?;
            file.sync_data().map_err(|e| e.to_string())?;
            let _ = h.record(begun.elapsed().as_micros().max(1) as u64);
        }
        let _ = std::fs::remove_file(&path);
        let ms = |q| h.value_at_quantile(q) as f64 / 1000.0;
        Ok::<(f64, f64), String>((ms(0.5), ms(0.99)))
    })
    .await
    .map_err(|e| e.to_string())??;
    let rtt_p50 =
        p50_ms(500, || async { client.participants().await.map(drop).map_err(|e| e.to_string()) }).await?;
    Ok(Floor { fsync_p50, fsync_p99, rtt_p50 })
}

pub(crate) fn progress(args: &BenchArgs, what: &str) -> ProgressBar {
    if args.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("  {spinner} {msg} {pos} tx ({per_sec})") {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub(crate) async fn seed_accounts(client: &Client, accounts: usize) -> Result<(), String> {
    for chunk in (0..accounts).collect::<Vec<_>>().chunks(200) {
        let ops = chunk.iter().map(|i| KvOp::Put { key: account(*i), value: b"0".to_vec() }).collect();
        let result = client.transact(ops).await.map_err(|e| e.to_string())?;
        if result.outcome != Outcome::Committed {
            return Err(format!("seeding aborted: {}", result.reason));
        }
    }
    Ok(())
}

/// One measured round of decree.
async fn decree_round(args: &BenchArgs, client: &Client, local: Option<&Local>) -> Result<Run, String> {
    let participants: Vec<String> =
        client.participants().await.map_err(|e| e.to_string())?.into_iter().map(|p| p.name).collect();
    let picker = Picker::new(args.accounts, args.zipf)?;
    let txn = decree_txn(client.clone(), args.workload, participants, picker);
    let txn = Arc::new(txn);
    let warm = txn.clone();
    drive(args, Duration::from_secs(1), &ProgressBar::hidden(), move |w, s| warm(w, s)).await;
    let before = match local {
        Some(local) => Some(local.counters().await?),
        None => None,
    };
    let bar = progress(args, "decree");
    let measured = txn.clone();
    let mut run = drive(args, args.duration, &bar, move |w, s| measured(w, s)).await;
    bar.finish_and_clear();
    if let (Some(local), Some(before)) = (local, before) {
        let after = local.counters().await?;
        let mut totals = [0.0; COUNTS];
        for (name, counts) in &after {
            let delta: [f64; COUNTS] =
                std::array::from_fn(|i| counts[i] - before.get(name).map_or(0.0, |b| b[i]));
            for i in 0..COUNTS {
                totals[i] += delta[i];
            }
            run.per_process.insert(name.clone(), delta);
        }
        run.fsyncs = Some(totals[0]);
        run.rpcs = Some(totals[2]);
        run.messages = Some(totals[2] + totals[3]);
        run.rss_mib = local.rss();
    }
    Ok(run)
}

async fn bench(args: BenchArgs) -> Result<(), String> {
    if args.participants == 0
        || args.concurrency == 0
        || args.accounts < 2
        || args.duration.is_zero()
        || args.rounds == 0
    {
        return Err(
            "need --participants, --concurrency, --rounds >= 1, --accounts >= 2 and --duration > 0".into()
        );
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r <= MAX_RATE)) {
        return Err(format!(
            "--rate must be a positive number of transactions per second, at most {MAX_RATE}"
        ));
    }
    if let Some(soak) = args.soak {
        return crate::soak::soak(&args, soak).await;
    }
    let say = |text: String| {
        if !args.json {
            println!("{text}");
        }
    };
    if args.coordinators == 0 || (args.kill_leader > 0 && args.coordinators < 3) {
        return Err("--coordinators must be at least 1, and 3 or more with --kill-leader".into());
    }
    let group = args.coordinators > 1;
    if group && (args.coordinator.is_some() || !args.scale_at.is_empty()) {
        return Err("--coordinators starts local clusters: drop --coordinator and --scale-at".into());
    }
    // With --tls, the plaintext cluster first, and its client: the channels
    // it opens before the TLS cluster installs this process's certificate
    // stay plaintext (the bank workload opens no new ones).
    let plaintext = match args.tls && !group {
        true => {
            say(format!(
                "decree bench: starting a plaintext coordinator and {} participants ...",
                args.participants
            ));
            Some(seeded(&args, None).await?)
        }
        false => None,
    };
    let pki = match args.tls {
        true => Some(
            tempfile::Builder::new().prefix("decree-bench-certs-").tempdir().map_err(|e| e.to_string())?,
        ),
        false => None,
    };
    let mut local = match &args.coordinator {
        Some(_) => None,
        None if group => {
            say(format!(
                "decree bench: starting a group of {} coordinators and {} participants ...",
                args.coordinators, args.participants
            ));
            Some(Local::start_with(&args, args.coordinators, pki.as_ref().map(|d| d.path())).await?)
        }
        None if plaintext.is_some() => {
            say(format!(
                "  and, beside it, the same over mutual TLS with a role policy ({} participants) ...",
                args.participants
            ));
            Some(Local::start_with(&args, 1, pki.as_ref().map(|d| d.path())).await?)
        }
        None => {
            say(format!("decree bench: starting a coordinator and {} participants ...", args.participants));
            Some(Local::start(&args).await?)
        }
    };
    // Beside a group, a single coordinator over the same participants' setup, in the same run.
    let single = match group {
        true => {
            say(format!("  and, beside it, a single coordinator and {} participants ...", args.participants));
            Some(seeded(&args, pki.as_ref().map(|d| d.path())).await?)
        }
        false => None,
    };
    let url = match (&args.coordinator, &local) {
        (Some(url), _) => url.clone(),
        (None, Some(local)) => local.cluster.coordinator_url(),
        (None, None) => unreachable!("a local cluster is started when no coordinator is given"),
    };
    let client = Client::connect(&url).await.map_err(|e| e.to_string())?;
    if args.workload == Workload::Bank {
        say(format!("seeding {} accounts ...", args.accounts));
        seed_accounts(&client, args.accounts).await?;
    }
    let probe_dir = match &local {
        Some(local) => local.cluster.dir().to_path_buf(),
        None => std::env::temp_dir(),
    };
    let measured = floor(&probe_dir, &client).await?;
    say(format!(
        "floor: fsync p50 {:.3} ms (p99 {:.3}), round trip p50 {:.3} ms -> 2F + 2R = {:.3} ms",
        measured.fsync_p50,
        measured.fsync_p99,
        measured.rtt_p50,
        measured.ms()
    ));

    if !args.scale_at.is_empty() {
        say(format!(
            "decree with ring changes at {:?} ...",
            args.scale_at.iter().map(|s| s.at).collect::<Vec<_>>()
        ));
        let phases = crate::scale::run(&args, &client, &say).await?;
        check_balances(&args, &client).await?;
        say("balances: sum 0, as seeded".into());
        if args.json {
            println!(
                "{}",
                json!({ "workload": format!("{:?}", args.workload).to_lowercase(),
                                   "participants": args.participants, "concurrency": args.concurrency,
                                   "phases": phases })
            );
        }
        return Ok(());
    }
    let mut baseline = match args.baseline {
        Some(Baseline::Postgres) => {
            say(format!("starting {} PostgreSQL servers for the baseline ...", args.participants));
            Some(crate::bench_pg::Peer::start(&args).await?)
        }
        None => None,
    };
    let (mut ours, mut theirs, mut alone) = (Run::default(), Run::default(), Run::default());
    let mut plain = Run::default();
    for round in 1..=args.rounds {
        if let Some((single, single_client)) = &single {
            say(format!("round {round}/{}: decree, single coordinator ...", args.rounds));
            alone.absorb(decree_round(&args, single_client, Some(single)).await?);
        }
        if let Some((local, client)) = &plaintext {
            say(format!("round {round}/{}: decree, plaintext ...", args.rounds));
            plain.absorb(decree_round(&args, client, Some(local)).await?);
        }
        let what = match (group, args.tls) {
            (true, _) => format!("a group of {}", args.coordinators),
            (false, true) => "decree over mutual TLS".into(),
            (false, false) => "decree".into(),
        };
        say(format!("round {round}/{}: {what} ...", args.rounds));
        ours.absorb(decree_round(&args, &client, local.as_ref()).await?);
        if let Some(peer) = baseline.as_mut() {
            say(format!("round {round}/{}: PostgreSQL 2PC ...", args.rounds));
            let bar = progress(&args, "postgres");
            theirs.absorb(peer.round(&args, &bar).await?);
            bar.finish_and_clear();
        }
    }
    let failovers = match local.as_mut() {
        Some(local) if args.kill_leader > 0 => {
            say(format!(
                "failover: killing the leader {} times, every {:?}, under the load ...",
                args.kill_leader, args.kill_every
            ));
            Some(crate::failover::run(&args, local, &client, &say).await?)
        }
        _ => None,
    };
    if args.workload == Workload::Bank {
        check_balances(&args, &client).await?;
        if let Some((_, single_client)) = &single {
            check_balances(&args, single_client).await?;
        }
        if let Some((_, client)) = &plaintext {
            check_balances(&args, client).await?;
        }
        say("balances: sum 0, as seeded".into());
    }
    let mut out = ours.to_json(measured.ms());
    if group {
        out["coordinators"] = json!(args.coordinators);
        out["group_floor_ms"] = json!(round(measured.group_ms()));
        out["single"] = alone.to_json(measured.ms());
        out["group_vs_single"] = json!(round(ours.tx_per_s() / alone.tx_per_s().max(1e-9)));
    }
    if let Some(failovers) = failovers {
        out["failover"] = failovers;
    }
    if args.tls {
        out["tls"] = json!(true);
    }
    if plaintext.is_some() {
        out["plaintext"] = plain.to_json(measured.ms());
        out["tls_vs_plaintext"] = json!(round(ours.tx_per_s() / plain.tx_per_s().max(1e-9)));
    }
    out["workload"] = json!(format!("{:?}", args.workload).to_lowercase());
    out["participants"] = json!(args.participants);
    out["concurrency"] = json!(if args.rate.is_some() { Value::Null } else { json!(args.concurrency) });
    out["rate"] = json!(args.rate);
    out["fsync_p50_ms"] = json!(round(measured.fsync_p50));
    out["fsync_p99_ms"] = json!(round(measured.fsync_p99));
    out["rtt_p50_ms"] = json!(round(measured.rtt_p50));
    out["worker_threads"] = json!(share_of_cores(&args));
    if baseline.is_some() {
        out["baseline"] = theirs.to_json(measured.ms());
        out["ratio"] = json!(round(ours.tx_per_s() / theirs.tx_per_s().max(1e-9)));
    }
    if args.json {
        println!("{out}");
    } else {
        print_table(&out);
    }
    Ok(())
}

/// A cluster with a single coordinator measured beside the one under test,
/// its client connected and its accounts seeded.
async fn seeded(args: &BenchArgs, tls: Option<&std::path::Path>) -> Result<(Local, Client), String> {
    let local = Local::start_with(args, 1, tls).await?;
    let client = Client::connect(&local.cluster.coordinator_url()).await.map_err(|e| e.to_string())?;
    if args.workload == Workload::Bank {
        seed_accounts(&client, args.accounts).await?;
    }
    Ok((local, client))
}

/// The bank's balances sum to 0 (each transfer moves one unit).
async fn check_balances(args: &BenchArgs, client: &Client) -> Result<(), String> {
    if args.workload != Workload::Bank {
        return Ok(());
    }
    let keys: Vec<String> = (0..args.accounts).map(account).collect();
    let mut total = 0i64;
    for chunk in keys.chunks(1000) {
        for value in client.get(chunk).await.map_err(|e| e.to_string())?.into_values().flatten() {
            total += String::from_utf8_lossy(&value).parse::<i64>().map_err(|e| e.to_string())?;
        }
    }
    if total != 0 {
        return Err(format!("the sum of balances is {total}, not 0: money was created or lost"));
    }
    Ok(())
}

fn print_table(out: &Value) {
    let row = |name: &str, v: &Value| {
        let rss: Vec<String> = v["rss_mib"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k} {v} MiB")).collect())
            .unwrap_or_default();
        println!("{name}");
        println!(
            "  committed      {} tx/s ({} committed, {} aborted, {} errors)",
            v["tx_per_s"], v["committed"], v["aborted"], v["errors"]
        );
        println!("  abort rate     {}", v["abort_rate"]);
        println!(
            "  latency        p50 {} ms  p99 {} ms  p99.9 {} ms",
            v["p50_ms"], v["p99_ms"], v["p999_ms"]
        );
        println!(
            "  per committed  {} fsyncs, {} RPCs ({} messages with those on streams)",
            v["fsyncs_per_tx"], v["rpcs_per_tx"], v["messages_per_tx"]
        );
        if !rss.is_empty() {
            println!("  peak RSS       {}", rss.join(", "));
        }
        if let Some(per) = v["per_process"].as_object().filter(|_| !v["cpu_us_per_tx"].is_null()) {
            let each: Vec<String> = per.iter().map(|(k, p)| format!("{k} {}", p["cpu_us_per_tx"])).collect();
            println!("  CPU per tx     {} µs in all ({})", v["cpu_us_per_tx"], each.join(", "));
        }
        if let Some(per) = v["per_process"].as_object().filter(|_| !v["allocations_per_tx"].is_null()) {
            let each: Vec<String> =
                per.iter().map(|(k, p)| format!("{k} {}", p["allocations_per_tx"])).collect();
            println!("  allocations    {} per tx in all ({})", v["allocations_per_tx"], each.join(", "));
        }
    };
    println!();
    match out.get("coordinators") {
        Some(n) => {
            row(&format!("decree, a group of {n} coordinators"), out);
            row("decree, a single coordinator", &out["single"]);
            println!("ratio            group / single = {}", out["group_vs_single"]);
            println!("group floor      {} ms (2 x fsync p50 + 3 x round trip p50)", out["group_floor_ms"]);
            println!("leader changes   {} while measured (elections no kill called)", out["leader_changes"]);
        }
        None if out.get("plaintext").is_some() => {
            row("decree over mutual TLS, every RPC checked against a role policy", out);
            row("decree in plaintext", &out["plaintext"]);
            println!("ratio            TLS / plaintext = {}", out["tls_vs_plaintext"]);
        }
        None => row("decree", out),
    }
    if let Some(failover) = out.get("failover") {
        println!(
            "failover         {} leader kills: gap to the next commit p50 {} ms, p99 {} ms, max {} ms; {} transactions without an outcome",
            failover["kills"], failover["gap_p50_ms"], failover["gap_p99_ms"], failover["gap_max_ms"], failover["unknown"]
        );
        println!(
            "election         a new leader coordinates after p50 {} ms, p99 {} ms",
            failover["elected_p50_ms"], failover["elected_p99_ms"]
        );
    }
    if let Some(baseline) = out.get("baseline") {
        row("PostgreSQL 2PC (client-side)", baseline);
        println!("ratio            decree / PostgreSQL = {}", out["ratio"]);
    }
    println!(
        "floor            {} ms (2 x fsync p50 {} ms + 2 x round trip p50 {} ms); fsync p99 {} ms",
        out["floor_ms"], out["fsync_p50_ms"], out["rtt_p50_ms"], out["fsync_p99_ms"]
    );
    if let Some(n) = out["worker_threads"].as_u64() {
        println!("threads          {n} worker(s) per process: the local cluster and this client share the machine's cores");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_loop_starts_each_period_and_none_at_or_past_the_end() {
        let first = Instant::now();
        let due: Vec<_> = starts(first, first + Duration::from_millis(10), 1000.0).collect();
        assert_eq!(due.len(), 10);
        assert_eq!(due[0], first);
        assert_eq!(due[9] - first, Duration::from_millis(9));
        // A period far past the run (or past what a Duration holds): one start, no wait for the next.
        for rate in [1e-12, 1e-300, f64::MIN_POSITIVE] {
            let due: Vec<_> = starts(first, first + Duration::from_secs(1), rate).collect();
            assert_eq!(due, [first], "rate {rate}");
        }
    }

    #[test]
    fn counters_sum_every_label_set_and_skip_comments() {
        let page = "# TYPE decree_log_fsyncs_total counter\ndecree_log_fsyncs_total 12\n\
                    decree_grpc_requests_total{a=\"b\"} 3\ndecree_grpc_requests_total{a=\"c\"} 4\n\
                    decree_log_fsyncs_total_other 99\n";
        assert_eq!(counter(page, "decree_log_fsyncs_total"), 12.0);
        assert_eq!(counter(page, "decree_grpc_requests_total"), 7.0);
        assert_eq!(counter(page, "missing"), 0.0);
    }

    #[test]
    fn zipf_and_uniform_pick_distinct_accounts_in_range() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for exponent in [None, Some(0.99)] {
            let picker = Picker::new(100, exponent).unwrap();
            for _ in 0..1000 {
                let (a, b) = picker.pair(&mut rng);
                assert!(a != b && a < 100 && b < 100);
            }
        }
        let zipf = Picker::new(10_000, Some(0.99)).unwrap();
        let hot = (0..10_000).filter(|_| zipf.pick(&mut rng) < 10).count();
        assert!(hot > 1000, "Zipf(0.99) favors the first accounts: {hot} of 10000 in the top 10");
    }
}
