//! `decree-participant`: the reference KV participant, the same as `decree participant`.

#[derive(clap::Parser)]
#[command(name = "decree-participant", version, about = "decree reference KV participant")]
struct Cli {
    #[command(flatten)]
    config: decree_participant::Config,
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
    std::process::exit(runtime.block_on(decree_participant::run(cli.config)));
}
