//! `decree-coordinator`: the same as `decree coordinator`.

#[derive(clap::Parser)]
#[command(name = "decree-coordinator", version, about = "decree two-phase-commit coordinator")]
struct Cli {
    #[command(flatten)]
    config: decree_coordinator::Config,
    #[command(flatten)]
    threads: decree_runtime::args::Threads,
}

fn main() {
    let args = decree_runtime::config_file::apply(std::env::args_os().collect(), 1).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let (cli, _): (Cli, _) = decree_runtime::args::parse(args);
    let runtime = cli.threads.runtime().unwrap_or_else(|err| {
        eprintln!("cannot start the runtime: {err}");
        std::process::exit(2)
    });
    std::process::exit(runtime.block_on(decree_coordinator::run(cli.config)));
}
