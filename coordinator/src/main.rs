//! `decree-coordinator`: the same as `decree coordinator`.

#[derive(clap::Parser)]
#[command(name = "decree-coordinator", version, about = "decree two-phase-commit coordinator")]
struct Cli {
    #[command(flatten)]
    config: decree_coordinator::Config,
}

#[tokio::main]
async fn main() {
    let args = decree_runtime::config_file::apply(std::env::args_os().collect(), 1).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let (cli, _): (Cli, _) = decree_runtime::args::parse(args);
    std::process::exit(decree_coordinator::run(cli.config).await);
}
