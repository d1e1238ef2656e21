//! An inventory service that takes part in decree transactions: a branch
//! reserves stock, and a reservation commits only together with the rest of
//! its transaction (say, the payment at another participant).
//!
//! Payload: UTF-8 lines `reserve <sku> <quantity>`. A branch votes NO when
//! there is not enough stock. Stock lives under `stock/<sku>` in the
//! participant's own log, so each commit applies exactly once.
//!
//! ```text
//! cargo run --release -p decree-participant --example inventory -- \
//!     --coordinator http://127.0.0.1:7000 --name inventory --listen 127.0.0.1:7101 \
//!     --data-dir /tmp/inventory --stock widget=10,gadget=5
//! ```
//!
//! It takes every flag of `decree participant` (crash points included) and
//! `--stock`, the stock to start with (only for SKUs it has never seen).

use std::collections::BTreeMap;

use clap::Parser;
use decree_participant::{Builder, Config, Log, Resource, Validated, Write};
use decree_proto::TxId;

#[derive(Parser)]
#[command(about = "an inventory service as a decree participant")]
struct Args {
    #[command(flatten)]
    config: Config,
    /// Starting stock, e.g. widget=10,gadget=5; SKUs already stocked keep their count.
    #[arg(long, value_parser = parse_stock, default_value = "")]
    stock: Stock,
}

#[derive(Clone, Debug, Default)]
struct Stock(BTreeMap<String, u64>);

fn parse_stock(text: &str) -> Result<Stock, String> {
    let mut stock = BTreeMap::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (sku, count) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected SKU=COUNT"))?;
        let count = count.parse().map_err(|_| format!("{item:?}: the count is not a number"))?;
        stock.insert(sku.to_owned(), count);
    }
    Ok(Stock(stock))
}

struct Inventory {
    log: Log,
    seed: Stock,
}

fn stock_key(sku: &str) -> Vec<u8> {
    format!("stock/{sku}").into_bytes()
}

/// The reservations of a payload, by SKU (repeated SKUs add up).
fn reservations(payload: &[u8]) -> Result<BTreeMap<String, u64>, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "the payload is not UTF-8".to_owned())?;
    let mut wanted = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["reserve", sku, quantity] => {
                let quantity: u64 = quantity.parse().map_err(|_| format!("{line:?}: bad quantity"))?;
                *wanted.entry(sku.to_string()).or_insert(0) += quantity;
            }
            _ => return Err(format!("{line:?}: expected `reserve <sku> <quantity>`")),
        }
    }
    Ok(wanted)
}

impl Inventory {
    fn stock(&self, sku: &str) -> Result<u64, String> {
        match self.log.get(&stock_key(sku)).map_err(|e| e.to_string())? {
            None => Ok(0),
            Some(bytes) => {
                String::from_utf8_lossy(&bytes).parse().map_err(|_| format!("corrupt stock of {sku}"))
            }
        }
    }
}

#[async_trait::async_trait]
impl Resource for Inventory {
    fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String> {
        Ok(reservations(payload)?.into_keys().collect())
    }

    async fn prepare(&self, _txid: TxId, payload: &[u8]) -> Validated {
        let check = || -> Result<Validated, String> {
            // The SKUs are locked: nobody else changes their stock until this branch is decided.
            let mut redo = String::new();
            for (sku, quantity) in reservations(payload)? {
                let left = self.stock(&sku)?;
                if left < quantity {
                    return Ok(Validated::Refused {
                        reason: format!("only {left} {sku} left, {quantity} wanted"),
                    });
                }
                redo.push_str(&format!("{sku} {}\n", left - quantity));
            }
            Ok(if redo.is_empty() {
                Validated::ReadOnly
            } else {
                Validated::Ready { redo: redo.into_bytes() }
            })
        };
        check().unwrap_or_else(|reason| Validated::Refused { reason })
    }

    async fn commit(&self, _txid: TxId, redo: &[u8]) -> Result<Vec<Write>, String> {
        // The redo holds the new counts: applying it twice is harmless, and it
        // goes into the same synced batch as the commit record anyway.
        String::from_utf8_lossy(redo)
            .lines()
            .map(|line| {
                let (sku, count) =
                    line.split_once(' ').ok_or_else(|| format!("corrupt redo line {line:?}"))?;
                Ok(Write::put(stock_key(sku), count))
            })
            .collect()
    }

    async fn recover(&self, _prepared: &[TxId]) -> Result<(), String> {
        // Stock the SKUs never seen before (once, durably).
        let mut writes = Vec::new();
        for (sku, count) in &self.seed.0 {
            if self.log.get(&stock_key(sku)).map_err(|e| e.to_string())?.is_none() {
                writes.push(Write::put(stock_key(sku), count.to_string()));
            }
        }
        if !writes.is_empty() {
            self.log.write(writes, true).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let args = decree_runtime::config_file::apply(std::env::args_os().collect(), 1).unwrap_or_else(|err| {
        eprintln!("inventory: {err}");
        std::process::exit(2)
    });
    let Args { config, stock } = Args::parse_from(args);
    let (valid, listen, process) = (config.validate(), config.listen, config.process.clone());
    let code = decree_runtime::serve::run_process(
        "inventory",
        &config.clone(),
        valid,
        &process,
        listen,
        |listener| {
            let builder = Builder::new(config);
            builder.serve(
                |log| Inventory { log: log.clone(), seed: stock },
                listener,
                decree_runtime::serve::shutdown_signal(),
            )
        },
    )
    .await;
    std::process::exit(code);
}
