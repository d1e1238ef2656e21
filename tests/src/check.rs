//! The invariants of TESTING.md, as checks over a live cluster.
//!
//! Transactions built by [`marked_transfer`] touch every participant they
//! name: each branch writes a marker key `marker-<tag>` and adds to one
//! account's balance key at the participant, the deltas summing to zero. After
//! recovery, [`markers`] tells whether a transaction is everywhere or nowhere
//! (I1), and [`balance_sum`] whether money was created or lost (I5).

use decree_client::{kv_payload as encode_batch, v1, Client, KvOp};

use decree_cluster::{HarnessError, Result};

/// How long [`unlocked`] keeps probing a key.
pub const LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// The key account `account`'s balance lives under at each participant.
pub fn balance_key(account: usize) -> String {
    format!("balance-{account}")
}

/// Branches of a marked transfer of `amount` on `account`, from the first
/// participant to each of the others; every branch writes `marker-<tag>`.
pub fn marked_transfer(tag: &str, participants: &[String], account: usize, amount: i64) -> Vec<v1::Branch> {
    let others = participants.len().saturating_sub(1) as i64;
    participants
        .iter()
        .enumerate()
        .map(|(i, participant)| {
            let delta = if i == 0 { -amount * others } else { amount };
            let ops = vec![
                KvOp::Put { key: format!("marker-{tag}"), value: tag.as_bytes().to_vec() },
                KvOp::Add { key: balance_key(account), delta },
            ];
            v1::Branch { participant: participant.clone(), payload: encode_batch(ops) }
        })
        .collect()
}

/// How many of `participants` hold the marker of `tag`.
pub async fn markers(client: &Client, tag: &str, participants: &[String]) -> Result<usize> {
    let mut present = 0;
    for participant in participants {
        let values = client.get_at(participant, vec![format!("marker-{tag}")]).await?;
        if values.first().is_some_and(Option::is_some) {
            present += 1;
        }
    }
    Ok(present)
}

/// Nothing of `tag` is applied at `participants`: at each the marker is
/// absent, or its read is refused because a branch in doubt holds it
/// (`REASON_IN_DOUBT`: prepared, not applied, and not served). Returns how
/// many refused.
pub async fn unapplied(client: &Client, tag: &str, participants: &[String]) -> Result<usize> {
    let mut in_doubt = 0;
    for participant in participants {
        match client.get_at(participant, vec![format!("marker-{tag}")]).await {
            Ok(values) if values.first().is_some_and(Option::is_some) => {
                return Err(HarnessError::Other(format!("{tag} is applied at {participant}")))
            }
            Ok(_) => {}
            Err(decree_client::ClientError::Status(status))
                if decree_client::Reason::of_status(&status) == decree_client::Reason::InDoubt =>
            {
                in_doubt += 1
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(in_doubt)
}

/// I1: the transaction is at every participant or at none. Returns whether it is everywhere.
pub async fn all_or_nothing(client: &Client, tag: &str, participants: &[String]) -> Result<bool> {
    match markers(client, tag, participants).await? {
        0 => Ok(false),
        n if n == participants.len() => Ok(true),
        n => Err(HarnessError::Other(format!(
            "atomicity violated: transaction {tag} is at {n} of {} participants",
            participants.len()
        ))),
    }
}

/// I5: the sum of accounts `0..accounts` over every participant.
pub async fn balance_sum(client: &Client, participants: &[String], accounts: usize) -> Result<i64> {
    let mut sum = 0i64;
    for participant in participants {
        let values = client.get_at(participant, (0..accounts).map(balance_key).collect()).await?;
        for bytes in values.into_iter().flatten() {
            let text = String::from_utf8_lossy(&bytes);
            sum += text.parse::<i64>().map_err(|_| {
                HarnessError::Other(format!("{participant} balance {text:?} is not a number"))
            })?;
        }
    }
    Ok(sum)
}

/// I6 (locks): every key in `keys` can be locked now at every participant.
/// Probes each with an `expect`-only transaction (read-only: it changes
/// nothing), retried until [`LOCK_CHECK`] passes: a probe can lose a race with
/// a phase two still finishing, but a key locked for good fails the check.
pub async fn unlocked(client: &Client, participants: &[String], keys: &[String]) -> Result<()> {
    for participant in participants {
        for key in keys {
            let last = std::sync::Mutex::new(String::new());
            let probe =
                decree_cluster::poll(LOCK_CHECK, &format!("{key} at {participant} to be unlocked"), || {
                    let last = &last;
                    async move {
                        let current =
                            client.get_at(participant, vec![key.to_string()]).await.ok()?.pop().flatten();
                        let ops = vec![KvOp::Expect { key: key.to_string(), value: current }];
                        let branch =
                            v1::Branch { participant: participant.clone(), payload: encode_batch(ops) };
                        match client.transact_branches(vec![branch]).await {
                            Ok(result) if result.outcome == decree_client::Outcome::Committed => Some(()),
                            Ok(result) => {
                                *last.lock().unwrap_or_else(|p| p.into_inner()) = result.reason;
                                None
                            }
                            Err(err) => {
                                *last.lock().unwrap_or_else(|p| p.into_inner()) = err.to_string();
                                None
                            }
                        }
                    }
                })
                .await;
            probe.map_err(|_| {
                let last = last.lock().unwrap_or_else(|p| p.into_inner());
                HarnessError::Other(format!("{key} at {participant} is still locked: {last}"))
            })?;
        }
    }
    Ok(())
}

/// What clients were told of marked transfers: tag, participants, outcome (`None`: no answer).
pub type Told = Vec<(String, Vec<String>, Option<decree_client::Outcome>)>;

/// I1 and I2 over `told`: every transfer is at all of its participants or at
/// none, every one reported committed is present and every one reported
/// aborted is absent. Returns (committed, aborted, without an outcome): a
/// transfer whose client heard no outcome, or FORGOTTEN (its outcome was
/// pruned before the client asked, after a failover), may be either.
pub async fn told_agrees(client: &Client, told: &Told) -> Result<(usize, usize, usize)> {
    use decree_client::Outcome;
    let (mut committed, mut aborted, mut unknown) = (0, 0, 0);
    for (tag, participants, outcome) in told {
        let everywhere = all_or_nothing(client, tag, participants).await?;
        match outcome {
            Some(Outcome::Committed) if !everywhere => {
                return Err(HarnessError::Other(format!("{tag} was reported committed but is missing")))
            }
            Some(Outcome::Committed) => committed += 1,
            Some(Outcome::Aborted) if everywhere => {
                return Err(HarnessError::Other(format!("{tag} was reported aborted but is present")))
            }
            Some(Outcome::Aborted) => aborted += 1,
            Some(Outcome::Pending) => {
                return Err(HarnessError::Other(format!(
                    "{tag} was answered PENDING: a final outcome was due"
                )))
            }
            Some(Outcome::Forgotten) | None => unknown += 1,
        }
    }
    Ok((committed, aborted, unknown))
}
