//! `decree-participant`: the reference KV participant, the same as `decree participant`.

#[derive(clap::Parser)]
#[command(name = "decree-participant", version, about = "decree reference KV participant")]
struct Cli {
    #[command(flatten)]
    config: decree_participant::Config,
}

#[tokio::main]
async fn main() {
    let cli = <Cli as clap::Parser>::parse();
    decree_runtime::serve::init_tracing();
    std::process::exit(decree_participant::run(cli.config).await);
}
