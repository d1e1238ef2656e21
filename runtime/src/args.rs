//! Command-line parsing that every decree binary shares: durations as people
//! type them, and a bad value always named with its option.

use std::time::Duration;

/// Parses a duration as people type it: `15s`, `500ms`, `2m`, `1h`, `250us`,
/// `1.5s`; a bare number is seconds (`10` is ten seconds). Negative, empty and
/// unknown units are refused with a message that says what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("{text:?}: a duration cannot be negative (use e.g. 15s, 500ms, 2m, 1h)"));
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use e.g. 15s, 500ms, 2m, 1h")),
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: use e.g. 15s, 500ms, 2m, 1h (a bare number is seconds)")
    })?;
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|e| format!("{text:?}: {e}"))
}

/// The threads that run a process's tasks: every decree binary takes
/// `--worker-threads` (or `DECREE_WORKER_THREADS`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Threads {
    /// Worker threads of this process's async runtime; default one per core. A process that
    /// shares a small machine with others (a local cluster) spends less CPU per transaction
    /// with fewer: wake-ups stay on one thread and its messages leave in fewer writes.
    #[arg(long, global = true, env = "DECREE_WORKER_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// How the log's writer thread is scheduled (Linux): `batch` lets a woken writer wait for
    /// the running thread's turn instead of preempting it (less CPU per transaction on busy
    /// cores); `normal` schedules it as every other thread.
    #[arg(long, global = true, env = "DECREE_LOG_WRITER", value_name = "POLICY", value_enum,
          default_value_t = crate::log::WriterPolicy::Batch)]
    pub log_writer: crate::log::WriterPolicy,
}

impl Threads {
    /// The process's runtime: multi-threaded, with every driver enabled.
    /// Also sets how the process's log writers are scheduled (`--log-writer`).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        crate::log::set_writer_policy(self.log_writer);
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            builder.worker_threads(usize::from(n));
        }
        builder.enable_all().build()
    }
}

/// The worker threads a process gets when `processes` share this machine
/// (each its share of the cores, at least one); `None` when each may have
/// them all.
pub fn share_of_cores(processes: usize) -> Option<u16> {
    share(std::thread::available_parallelism().map_or(1, usize::from), processes)
}

fn share(cores: usize, processes: usize) -> Option<u16> {
    let share = (cores / processes.max(1)).max(1);
    (share < cores).then(|| u16::try_from(share).unwrap_or(u16::MAX))
}

/// Parses the command line with [`name_bad_values`] applied; exits as clap
/// does (help, version, or a usage error with exit code 2). The matches come
/// back too, for what the parsed type does not keep (e.g. the order of flags).
pub fn parse<P: clap::Parser>(args: impl IntoIterator<Item = std::ffi::OsString>) -> (P, clap::ArgMatches) {
    let matches = name_bad_values(P::command()).get_matches_from(args);
    let parsed = P::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    (parsed, matches)
}

/// Makes every option that takes a value accept one that looks like a negative
/// number (`--prepare-timeout-ms -5`), in this command and its subcommands, so
/// that a bad value is refused by its option's parser, which names the option
/// ("invalid value '-5' for '--prepare-timeout-ms <MS>'"), instead of being
/// taken for an unknown flag.
pub fn name_bad_values(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| if arg.get_action().takes_values() { arg.allow_negative_numbers(true) } else { arg })
        .mut_subcommands(name_bad_values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_sharing_a_machine_get_their_share_of_its_cores() {
        assert_eq!(share(2, 5), Some(1), "more processes than cores: one worker each");
        assert_eq!(share(16, 5), Some(3));
        assert_eq!(share(16, 1), None, "alone: every core, the runtime's default");
        assert_eq!(share(1, 5), None, "one core: one worker is the default already");
        assert_eq!(share(4, 0), None);
    }

    #[test]
    fn durations_take_the_forms_people_type() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 3s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn bad_durations_are_refused_with_what_is_accepted() {
        for bad in ["", "s", "-5s", "5x", "1.2.3s", "ms5", "5 parsecs"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("e.g. 15s"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_log_writer_policy_is_batch_unless_asked() {
        #[derive(clap::Parser, Debug)]
        struct Flags {
            #[command(flatten)]
            threads: Threads,
        }
        let parse =
            |args: &[&str]| <Flags as clap::Parser>::try_parse_from(args).map(|f| f.threads.log_writer);
        assert_eq!(parse(&["x"]).unwrap(), crate::log::WriterPolicy::Batch);
        assert_eq!(parse(&["x", "--log-writer", "normal"]).unwrap(), crate::log::WriterPolicy::Normal);
        for policy in [crate::log::WriterPolicy::Batch, crate::log::WriterPolicy::Normal] {
            let [flag, value] = policy.flag();
            assert_eq!(
                parse(&["x", &flag, &value]).unwrap(),
                policy,
                "the flag passed on to a local cluster"
            );
        }
        let err = parse(&["x", "--log-writer", "fifo"]).unwrap_err().to_string();
        assert!(err.contains("--log-writer") && err.contains("batch, normal"), "{err}");
    }

    #[test]
    fn a_negative_value_is_named_with_its_option() {
        #[derive(clap::Parser, Debug)]
        struct Flags {
            #[arg(long)]
            timeout_ms: u64,
            #[arg(long)]
            delta: Option<i64>,
        }
        let command = name_bad_values(<Flags as clap::CommandFactory>::command());
        let err = command.clone().try_get_matches_from(["x", "--timeout-ms", "-5"]).unwrap_err().to_string();
        assert!(err.contains("--timeout-ms") && err.contains("-5"), "{err}");
        let matches = command.try_get_matches_from(["x", "--timeout-ms", "5", "--delta", "-7"]).unwrap();
        assert_eq!(matches.get_one::<i64>("delta"), Some(&-7));
    }
}
