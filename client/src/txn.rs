//! Interactive transactions: `Begin`, reads and writes at the participants
//! under the txid (each key routed by the ring; read and written keys stay
//! locked until the decision; reads see the transaction's own writes), then
//! `Commit` or `Abort`.
//!
//! ```no_run
//! # async fn demo(client: decree_client::Client) -> Result<(), decree_client::ClientError> {
//! let mut tx = client.begin().await?;
//! let from = tx.get_i64("alice").await?;
//! if from >= 10 {
//!     tx.add("alice", -10).await?;
//!     tx.add("bob", 10).await?;
//! }
//! let result = tx.commit().await?;
//! println!("{} {}", result.txid, result.outcome.as_str());
//! # Ok(()) }
//! ```

use std::time::Duration;

use decree_proto::v1::kv_client::KvClient;

use crate::{decided_error, v1, Client, ClientError, KvOp, Outcome, Reason, TxnResult};

/// An interactive transaction. Dropping it without `commit` or `abort` leaves
/// it to the idle timeouts of the coordinator and the participants.
pub struct Transaction {
    client: Client,
    txid: String,
    /// Set once the transaction is known to be aborted.
    /// Set once the transaction is aborted here (its work was refused for good).
    aborted: Option<(Reason, String)>,
    /// The participants it worked at.
    touched: std::collections::BTreeSet<String>,
}

impl Client {
    /// Commits the interactive transaction `txid`. A Commit refused by a
    /// replica that does not lead is sent again, to the leader; one whose
    /// coordinator was lost, restarted or stopped leading before it answered
    /// is asked of the next (`GetOutcome`): decided, that is the answer;
    /// still active there (a coordinator, and a group, knows every
    /// interactive transaction begun, with its enlisted branches), it is
    /// committed again; preparing or deciding, it is asked until it is
    /// known, for up to [`crate::FAILOVER_WAIT`].
    async fn commit_interactive(&self, txid: &str) -> Result<TxnResult, ClientError> {
        let request = v1::CommitTransactionRequest { txid: txid.to_owned(), pending_outcome: true };
        let deadline = tokio::time::Instant::now() + crate::FAILOVER_WAIT;
        let mut attempt = 0;
        // Why an earlier Commit's outcome is not known, once one's is not.
        let mut unknown: Option<String> = None;
        loop {
            let why = match self.coordinator.clone().commit(request.clone()).await {
                Ok(response) => {
                    let response = response.into_inner();
                    let lost_leader = response.outcome == v1::Outcome::Pending as i32
                        && Reason::from_wire(response.reason_code) == Reason::NotLeader;
                    if !lost_leader {
                        return TxnResult::from_wire(response);
                    }
                    Some(response.reason)
                }
                // Nothing was done: send it again.
                Err(status) if crate::not_started(&status) => None,
                // Not active here: an earlier Commit began it, whose outcome is asked.
                Err(status) if status.code() == tonic::Code::FailedPrecondition && unknown.is_some() => {
                    let why = unknown.unwrap_or_default();
                    return self.resolve(txid.to_owned(), why, 0).await;
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::FailedPrecondition
                            | tonic::Code::InvalidArgument
                            | tonic::Code::ResourceExhausted
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(decided_error(status))
                }
                Err(status) => Some(status.message().to_owned()),
            };
            if let Some(why) = why {
                // Pending (still active at the leader, or deciding), or no
                // leader yet: Commit again, taken only if it is active.
                if let Ok(outcome @ (Outcome::Committed | Outcome::Aborted | Outcome::Forgotten)) =
                    self.status(txid).await
                {
                    return Ok(TxnResult {
                        txid: txid.to_owned(),
                        outcome,
                        code: Reason::Unspecified,
                        reason: format!("told by the coordinator after a failover or restart ({why})"),
                        participants: Vec::new(),
                    });
                }
                unknown = Some(why);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match unknown {
                    Some(reason) => ClientError::OutcomeUnknown { txid: txid.to_owned(), reason },
                    None => ClientError::Status(tonic::Status::unavailable("no coordinator took the Commit")),
                });
            }
            tokio::time::sleep(crate::failover_pause(attempt)).await;
            attempt += 1;
        }
    }

    /// Aborts the interactive transaction `txid`, again while no coordinator
    /// answers (one restarting, a group between leaders), for up to
    /// [`crate::FAILOVER_WAIT`]: an abort repeated changes nothing, and one
    /// that never arrives leaves the transaction's locks held until its idle
    /// timeout.
    async fn abort_interactive(&self, txid: &str) -> Result<(), ClientError> {
        let request = v1::AbortTransactionRequest { txid: txid.to_owned() };
        self.ask_again_while(&self.coordinator, crate::unanswered, |mut c| {
            let request = request.clone();
            async move { c.abort(request).await }
        })
        .await?;
        Ok(())
    }

    /// Begins an interactive transaction; the coordinator aborts it if it is
    /// not committed within its default idle timeout.
    pub async fn begin(&self) -> Result<Transaction, ClientError> {
        self.begin_with_timeout(Duration::ZERO).await
    }

    /// Begins an interactive transaction that aborts if not committed within
    /// `timeout` (zero: the coordinator's default).
    pub async fn begin_with_timeout(&self, timeout: Duration) -> Result<Transaction, ClientError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let response =
            self.ask(&self.coordinator, false, |mut c| async move {
                c.begin(v1::BeginRequest { timeout_ms }).await
            })
            .await?;
        Ok(Transaction {
            client: self.clone(),
            txid: response.txid,
            aborted: None,
            touched: Default::default(),
        })
    }
}

impl Transaction {
    pub fn txid(&self) -> &str {
        &self.txid
    }

    /// Runs `ops` and then reads `get`, at the participant that owns `key`'s
    /// ring position (all of them must route to it). Returns the values read.
    async fn execute_at(
        &mut self,
        key: &str,
        ops: Vec<KvOp>,
        get: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        if let Some((code, reason)) = &self.aborted {
            return Err(ClientError::Aborted {
                txid: self.txid.clone(),
                code: *code,
                reason: reason.clone(),
            });
        }
        KvOp::check_key(key)?;
        let mut attempt = 0;
        let status = loop {
            let owner = self.client.route(key)?;
            self.touched.insert(owner.clone());
            let channel = self.client.channel_to(&owner)?;
            let request = v1::ExecuteRequest {
                txid: self.txid.clone(),
                ops: ops.iter().cloned().map(Into::into).collect(),
                get: get.clone(),
                migration: None,
            };
            match KvClient::new(channel).execute(request).await {
                Ok(response) => {
                    return Ok(response.into_inner().values.into_iter().map(|kv| kv.value).collect())
                }
                // Not that participant's key (any more), or moving: the work did nothing; route it again.
                Err(status) if crate::reroute(Reason::of_status(&status)) => {
                    if !self.client.rerouted(attempt).await {
                        break status;
                    }
                    attempt += 1;
                }
                Err(status) => break status,
            }
        };
        if status.code() != tonic::Code::Aborted {
            return Err(status.into());
        }
        // The branch is gone (a lost lock conflict, or its enlistment failed):
        // end the whole transaction now, so its other branches let go of their
        // locks. The caller hears it at once; the abort reaches the coordinator
        // as soon as one answers (it may be restarting).
        let reason = status.message().to_owned();
        let code = Reason::of_status(&status);
        self.aborted = Some((code, reason.clone()));
        let (client, txid) = (self.client.clone(), self.txid.clone());
        tokio::spawn(async move { drop(client.abort_interactive(&txid).await) });
        Err(ClientError::Aborted { txid: self.txid.clone(), code, reason })
    }

    /// The value of `key` as this transaction sees it; the key stays locked
    /// until the decision.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let mut values = self.execute_at(key, Vec::new(), vec![key.to_owned()]).await?;
        Ok(values.pop().flatten())
    }

    /// The value of `key` as a decimal integer (absent: 0).
    pub async fn get_i64(&mut self, key: &str) -> Result<i64, ClientError> {
        match self.get(key).await? {
            None => Ok(0),
            Some(bytes) => String::from_utf8_lossy(&bytes).parse().map_err(|_| ClientError::NotANumber {
                key: key.to_owned(),
                value: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }

    /// Writes `value` to `key` (buffered at its participant until commit).
    pub async fn put(&mut self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        let op = KvOp::Put { key: key.to_owned(), value: value.into() };
        self.execute_at(key, vec![op], Vec::new()).await.map(drop)
    }

    pub async fn delete(&mut self, key: &str) -> Result<(), ClientError> {
        self.execute_at(key, vec![KvOp::Delete { key: key.to_owned() }], Vec::new()).await.map(drop)
    }

    /// Adds `delta` to the decimal integer at `key` (absent: 0).
    pub async fn add(&mut self, key: &str, delta: i64) -> Result<(), ClientError> {
        self.execute_at(key, vec![KvOp::Add { key: key.to_owned(), delta }], Vec::new()).await.map(drop)
    }

    /// Commits: two-phase commit over every participant the transaction
    /// worked at. ABORTED comes back with the reason.
    pub async fn commit(self) -> Result<TxnResult, ClientError> {
        if let Some((code, reason)) = self.aborted {
            return Ok(TxnResult {
                txid: self.txid,
                outcome: Outcome::Aborted,
                code,
                reason,
                participants: Vec::new(),
            });
        }
        let mut result = self.client.commit_interactive(&self.txid).await?;
        if result.participants.is_empty() {
            // An interactive Commit's answer names no participants: the ones worked at.
            result.participants = self.touched.into_iter().collect();
        }
        Ok(result)
    }

    /// Aborts: every participant releases the transaction's locks and drops its writes.
    pub async fn abort(self) -> Result<(), ClientError> {
        if self.aborted.is_some() {
            return Ok(());
        }
        self.client.abort_interactive(&self.txid).await
    }
}
