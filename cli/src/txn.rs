//! `decree txn`: one transaction from the command line.

use clap::ArgMatches;
use decree_client::{Client, KvOp, Outcome};
use serde_json::json;

use crate::{Failure, TxnFailure};

#[derive(clap::Args)]
pub struct TxnArgs {
    /// The coordinator's URL.
    #[arg(long, env = "DECREE_COORDINATOR", default_value = "http://127.0.0.1:7000")]
    coordinator: String,
    #[command(flatten)]
    tls: decree_tls::TlsArgs,
    /// Set K to V.
    #[arg(long, value_name = "K=V")]
    put: Vec<String>,
    /// Add the signed 64-bit integer N to the decimal value of K (absent counts as 0).
    #[arg(long, value_name = "K=N", allow_hyphen_values = true)]
    add: Vec<String>,
    /// Remove K.
    #[arg(long, value_name = "K")]
    delete: Vec<String>,
    /// Abort unless K holds exactly V (`K=` for absent).
    #[arg(long, value_name = "K=V")]
    expect: Vec<String>,
    /// Print {"txid", "outcome", "reason", "participants"} as JSON.
    #[arg(long)]
    json: bool,
}

impl TxnArgs {
    pub fn tls(&self) -> &decree_tls::TlsArgs {
        &self.tls
    }
}

const KINDS: [&str; 4] = ["put", "add", "delete", "expect"];

/// The position of each op flag on the command line, so ops apply in the order given.
pub fn op_order(matches: &ArgMatches) -> Vec<(usize, &'static str, usize)> {
    let mut order = Vec::new();
    for kind in KINDS {
        if let Some(indices) = matches.indices_of(kind) {
            order.extend(indices.enumerate().map(|(nth, at)| (at, kind, nth)));
        }
    }
    order.sort();
    order
}

fn split(kind: &str, text: &str) -> Result<(String, String), Failure> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(Failure(format!("--{kind} {text:?}: expected K=V")));
    };
    KvOp::check_key(key)?;
    Ok((key.to_owned(), value.to_owned()))
}

fn parse_ops(args: &TxnArgs, order: &[(usize, &'static str, usize)]) -> Result<Vec<KvOp>, Failure> {
    let mut ops = Vec::new();
    for (_, kind, nth) in order {
        let op = match *kind {
            "put" => {
                let (key, value) = split(kind, &args.put[*nth])?;
                KvOp::Put { key, value: value.into_bytes() }
            }
            "add" => {
                let (key, n) = split(kind, &args.add[*nth])?;
                let delta = n
                    .parse::<i64>()
                    .map_err(|_| Failure(format!("--add {key}={n}: {n:?} is not a signed 64-bit integer")))?;
                KvOp::Add { key, delta }
            }
            "delete" => {
                let key = args.delete[*nth].clone();
                KvOp::check_key(&key)?;
                KvOp::Delete { key }
            }
            "expect" => {
                let (key, value) = split(kind, &args.expect[*nth])?;
                let value = (!value.is_empty()).then(|| value.into_bytes());
                KvOp::Expect { key, value }
            }
            other => unreachable!("unknown op kind {other}"),
        };
        ops.push(op);
    }
    if ops.is_empty() {
        return Err(Failure(
            "empty transaction: give at least one --put, --add, --delete or --expect".into(),
        ));
    }
    Ok(ops)
}

pub async fn run(args: TxnArgs, order: Vec<(usize, &'static str, usize)>) -> i32 {
    let result = async {
        let ops = parse_ops(&args, &order)?;
        let client = Client::connect(&args.coordinator).await?;
        Ok::<_, TxnFailure>(client.transact(ops).await?)
    }
    .await;
    match result {
        Ok(result) => {
            if args.json {
                let out = json!({
                    "txid": result.txid,
                    "outcome": result.outcome.as_str(),
                    "reason": result.reason,
                    "reason_code": result.code.label(),
                    "participants": result.participants,
                });
                println!("{out}");
            } else if result.outcome == Outcome::Committed {
                println!("{} committed ({})", result.txid, result.participants.join(", "));
            } else {
                println!("{} aborted: {}", result.txid, result.reason);
            }
            match result.outcome {
                Outcome::Committed => 0,
                Outcome::Aborted => 1,
                Outcome::Pending | Outcome::Forgotten => 2,
            }
        }
        Err(TxnFailure { message, txid }) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "txid": txid, "outcome": "unknown", "reason": message, "participants": [] })
                );
            }
            eprintln!("decree txn: {message}");
            2
        }
    }
}
