//! `decree-coordinator`: the same as `decree coordinator`.

#[derive(clap::Parser)]
#[command(name = "decree-coordinator", version, about = "decree two-phase-commit coordinator")]
struct Cli {
    #[command(flatten)]
    config: decree_coordinator::Config,
}

#[tokio::main]
async fn main() {
    let cli = <Cli as clap::Parser>::parse();
    decree_runtime::serve::init_tracing();
    std::process::exit(decree_coordinator::run(cli.config).await);
}
