//! `decree-participant`: the reference KV participant, the same as `decree participant`.

#[derive(clap::Parser)]
#[command(name = "decree-participant", version, about = "decree reference KV participant")]
struct Cli {
    #[command(flatten)]
    config: decree_participant::Config,
}

#[tokio::main]
async fn main() {
    let args = decree_runtime::config_file::apply(std::env::args_os().collect(), 1).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let (cli, _): (Cli, _) = decree_runtime::args::parse(args);
    std::process::exit(decree_participant::run(cli.config).await);
}
