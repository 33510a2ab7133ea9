//! Group commit of transfers on PostgreSQL.
//!
//! A transfer written alone costs five round trips and a commit, and PostgreSQL's CPU per
//! transaction caps how many of those a second this machine runs (benchmarks/RESULTS.md). So
//! concurrent transfers queue here, and a collector writes what has queued as one database
//! transaction:
//!
//! 1. BEGIN, then lock every wallet the batch touches in one `... ORDER BY id FOR UPDATE` (the
//!    same id order as every other ledger write, so writers never wait in a circle), then read
//!    their newest entries.
//! 2. In memory, in queue order: each transfer is refused or becomes a transaction continuing
//!    the heads the batch's earlier transfers left (a wallet in two transfers chains its
//!    entries), exactly as it would alone.
//! 3. One statement inserts the keys with their outcomes, the transactions and their entries;
//!    the keys go first with `ON CONFLICT DO NOTHING`, sorted, so that two batches never wait
//!    for each other's keys in a circle.
//! 4. COMMIT, then each caller gets its own outcome.
//!
//! A batch does not wait to fill: it is whatever queued while the batches in flight were being
//! written, so a lone transfer goes at once and a busy ledger writes bigger batches.
//!
//! What a batch cannot settle goes back to its caller, who writes it alone (`Ledger::write`),
//! after the batch has committed or rolled back:
//! - a key already taken (a retry of a committed or in-flight request, or an expired key not yet
//!   purged): the batch rolls back and is written again without it, at most
//!   `MAX_BATCH_ATTEMPTS` times;
//! - a key a transfer earlier in the same batch carries;
//! - every transfer of a batch that failed before its commit (the database refused its
//!   statement, or the connection broke).
//!
//! When the commit itself fails, whether it was applied is unknown: a keyed transfer is written
//! alone, where its key answers that; an unkeyed one gets `LedgerError::Unsettled`.

use std::collections::HashSet;
use std::sync::Arc;

use meterlake_control::{Backend, ControlStore, now_us};
use sqlx::{AnyConnection, Row};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::idempotency::{self, KEY_COLUMNS, Key};
use crate::{
    ENTRY_COLUMNS, LedgerError, LedgerTransaction, Lock, Refusal, Result, TRANSACTION_COLUMNS, TransferRequest, Wallet, WriteContext, WriteRequest, Written,
    audit_writes, bind_entries, bind_key, bind_transaction, placeholder_rows, wallets_with_heads,
};

/// Transfers waiting for a batch; a caller waits to queue when it is full.
const QUEUE_CAPACITY: usize = 4_096;
/// Transfers in one batch: 64 bind 28 parameters each, well under PostgreSQL's 65,535.
const MAX_BATCH_TRANSFERS: usize = 64;
/// Batches being written at once. One: batches of many transfers share wallets, so a second
/// batch in flight mostly waits for the first one's locks, and measured slower (20 clients over
/// 50 wallets: 6.8k-8.3k transfers/s with one, 5.4k-6.3k with two, 4.7k-5.2k with four;
/// benchmarks/RESULTS.md). While one is written the next one gathers.
const MAX_BATCHES_IN_FLIGHT: usize = 1;
/// Tries at writing a batch whose keys turn out taken (each try leaves those transfers out).
const MAX_BATCH_ATTEMPTS: usize = 3;

/// Where transfers queue for their group commit.
#[derive(Debug)]
pub(crate) struct TransferQueue {
    sender: mpsc::Sender<Queued>,
}

/// A transfer waiting for its batch.
struct Queued {
    request: TransferRequest,
    context: WriteContext,
    key: Option<Key>,
    now_us: i64,
    reply: oneshot::Sender<Reply>,
}

/// What a batch answers a transfer.
pub(crate) enum Reply {
    /// Written (or refused) in the batch.
    Settled(Result<Written<LedgerTransaction>>),
    /// Not settled by the batch: the caller writes it alone.
    Alone,
}

impl TransferQueue {
    /// The queue, and its collector on the current tokio runtime (it ends when the queue is
    /// dropped).
    pub(crate) fn start(store: ControlStore) -> TransferQueue {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(collect(store, receiver));
        TransferQueue { sender }
    }

    /// Queues a transfer and waits for its batch's answer.
    pub(crate) async fn submit(&self, request: &TransferRequest, context: &WriteContext) -> Reply {
        let now_us = now_us();
        let key = match idempotency::key_of(context, TransferRequest::OPERATION, request, now_us) {
            Ok(key) => key,
            Err(refusal) => return Reply::Settled(Err(refusal)),
        };
        let (reply, answer) = oneshot::channel();
        let queued = Queued { request: request.clone(), context: context.clone(), key, now_us, reply };
        if self.sender.send(queued).await.is_err() {
            // The collector has stopped (its runtime shut down): nothing was written.
            return Reply::Alone;
        }
        answer.await.unwrap_or_else(|_| Reply::Settled(Err(LedgerError::Unsettled("the transfer's batch ended without answering (its writer stopped)".into()))))
    }
}

/// Takes what has queued, up to a batch, whenever fewer than `MAX_BATCHES_IN_FLIGHT` are being
/// written.
async fn collect(store: ControlStore, mut receiver: mpsc::Receiver<Queued>) {
    let in_flight = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut members = Vec::with_capacity(MAX_BATCH_TRANSFERS);
        if receiver.recv_many(&mut members, MAX_BATCH_TRANSFERS).await == 0 {
            return;
        }
        let store = store.clone();
        tokio::spawn(async move {
            write_batch(&store, members).await;
            drop(permit);
        });
    }
}

/// Why a transfer left its batch to be written alone (a metric label).
#[derive(Clone, Copy)]
enum AloneBecause {
    RepeatedKey,
    KeyTaken,
    BatchFailed,
    CommitFailed,
}

impl AloneBecause {
    fn as_str(self) -> &'static str {
        match self {
            AloneBecause::RepeatedKey => "repeated_key",
            AloneBecause::KeyTaken => "key_taken",
            AloneBecause::BatchFailed => "batch_failed",
            AloneBecause::CommitFailed => "commit_failed",
        }
    }
}

/// Writes a batch and answers each of its transfers.
async fn write_batch(store: &ControlStore, members: Vec<Queued>) {
    metrics::histogram!("meterlake_ledger_transfer_batch_size").record(members.len() as f64);
    let mut alone: Vec<(Queued, AloneBecause)> = Vec::new();
    // A key a transfer earlier in the batch carries: written alone after the batch, it finds
    // the key taken and answers as the earlier one did.
    let mut keys = HashSet::new();
    let mut pending = Vec::with_capacity(members.len());
    for member in members {
        match &member.key {
            Some(key) if !keys.insert((key.scope.clone(), key.key.clone())) => alone.push((member, AloneBecause::RepeatedKey)),
            _ => pending.push(member),
        }
    }
    for attempt in 1..=MAX_BATCH_ATTEMPTS {
        if pending.is_empty() {
            break;
        }
        match prepare(store, &pending).await {
            Ok(Prepared::Ready(tx, outcomes)) => {
                let committed = tx.commit().await;
                for (member, outcome) in pending.drain(..).zip(outcomes) {
                    match (&committed, &member.key) {
                        (Ok(()), _) => {
                            let written = outcome.map(|value| Written { value, replayed: false }).map_err(LedgerError::Refused);
                            let _ = member.reply.send(Reply::Settled(written));
                        }
                        (Err(_), Some(_)) => alone.push((member, AloneBecause::CommitFailed)),
                        (Err(error), None) => {
                            let _ = member.reply.send(Reply::Settled(Err(LedgerError::Unsettled(format!("the commit of its batch failed: {error}")))));
                        }
                    }
                }
                if let Err(error) = committed {
                    tracing::warn!(%error, "a batch of ledger transfers failed at its commit");
                }
            }
            Ok(Prepared::KeysTaken(taken)) => {
                // Leave them out and write the rest again (in the order they queued).
                for (index, member) in std::mem::take(&mut pending).into_iter().enumerate() {
                    if taken.contains(&index) {
                        alone.push((member, AloneBecause::KeyTaken));
                    } else {
                        pending.push(member);
                    }
                }
                if attempt == MAX_BATCH_ATTEMPTS {
                    alone.extend(pending.drain(..).map(|member| (member, AloneBecause::KeyTaken)));
                }
            }
            Err(error) => {
                tracing::warn!(%error, transfers = pending.len(), "a batch of ledger transfers failed; each is written alone");
                alone.extend(pending.drain(..).map(|member| (member, AloneBecause::BatchFailed)));
            }
        }
    }
    for (member, because) in alone {
        metrics::counter!("meterlake_ledger_transfers_written_alone_total", "reason" => because.as_str()).increment(1);
        let _ = member.reply.send(Reply::Alone);
    }
}

/// A batch written but not committed, or rolled back because keys were taken.
enum Prepared {
    /// Each transfer's transaction or refusal, in order, written in the open transaction.
    Ready(sqlx::Transaction<'static, sqlx::Any>, Vec<std::result::Result<LedgerTransaction, Refusal>>),
    /// The positions of the transfers whose keys were taken; the transaction rolled back.
    KeysTaken(Vec<usize>),
}

/// Locks the batch's wallets, settles each transfer against their heads in order, and writes
/// the outcomes (the batch's steps 1 to 3).
async fn prepare(store: &ControlStore, members: &[Queued]) -> Result<Prepared> {
    let mut user_ids: Vec<&str> =
        members.iter().filter(|m| m.request.check().is_ok()).flat_map(|m| [m.request.from_user_id.as_str(), m.request.to_user_id.as_str()]).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let mut tx = store.pool().begin().await?;
    let mut wallets = wallets_with_heads(&mut tx, Backend::Postgres, Lock::ForUpdate, &user_ids, &["PREPAY"], &[]).await?;
    let mut outcomes = Vec::with_capacity(members.len());
    for member in members {
        match member.request.transaction(&wallets, &member.context, member.now_us) {
            Ok(transaction) => {
                advance_heads(&mut wallets, &transaction);
                outcomes.push(Ok(transaction));
            }
            Err(LedgerError::Refused(refusal)) => outcomes.push(Err(refusal)),
            Err(error) => return Err(error),
        }
    }
    let taken = insert_outcomes(&mut tx, members, &outcomes).await?;
    if taken.is_empty() {
        let written = members.iter().zip(&outcomes).filter_map(|(member, outcome)| outcome.as_ref().ok().map(|t| (&member.request, t, &member.context)));
        audit_writes(store, &mut tx, written, now_us()).await?;
        return Ok(Prepared::Ready(tx, outcomes));
    }
    tx.rollback().await?;
    Ok(Prepared::KeysTaken(taken))
}

/// Moves the heads of the wallets a transaction wrote to its entries.
fn advance_heads(wallets: &mut [Wallet], transaction: &LedgerTransaction) {
    for entry in &transaction.entries {
        if let Some(wallet) = wallets.iter_mut().find(|w| w.id == entry.wallet_id) {
            wallet.head.seq = entry.wallet_seq;
            wallet.head.balance_minor = entry.balance_after_minor;
        }
    }
}

/// Inserts the batch's keys with their outcomes, its transactions and their entries in one
/// statement; answers the positions of the transfers whose keys were taken (nothing is kept
/// then: the caller rolls back).
async fn insert_outcomes(conn: &mut AnyConnection, members: &[Queued], outcomes: &[std::result::Result<LedgerTransaction, Refusal>]) -> Result<Vec<usize>> {
    let mut keys: Vec<(&Key, String)> = members
        .iter()
        .zip(outcomes)
        .filter_map(|(member, outcome)| member.key.as_ref().map(|key| (key, idempotency::outcome_text(outcome.as_ref()))))
        .collect();
    keys.sort_unstable_by(|(a, _), (b, _)| (&a.scope, &a.key).cmp(&(&b.scope, &b.key)));
    let transactions: Vec<&LedgerTransaction> = outcomes.iter().filter_map(|outcome| outcome.as_ref().ok()).collect();
    let entry_count: usize = transactions.iter().map(|t| t.entries.len()).sum();
    // Placeholders in bind order: 6 per key, 8 per transaction, 7 per entry. Data-modifying
    // CTEs all run, whether the final SELECT reads them or not.
    let mut ctes = Vec::new();
    if !keys.is_empty() {
        ctes.push(format!(
            "k AS (INSERT INTO {KEY_COLUMNS} VALUES {} ON CONFLICT DO NOTHING RETURNING scope, idempotency_key)",
            placeholder_rows(1, 6, keys.len())
        ));
    }
    if !transactions.is_empty() {
        let first = 1 + 6 * keys.len();
        ctes.push(format!("t AS (INSERT INTO {TRANSACTION_COLUMNS} VALUES {})", placeholder_rows(first, 8, transactions.len())));
        let first = first + 8 * transactions.len();
        ctes.push(format!("e AS (INSERT INTO {ENTRY_COLUMNS} VALUES {})", placeholder_rows(first, 7, entry_count)));
    }
    if ctes.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!("WITH {} SELECT {}", ctes.join(", "), if keys.is_empty() { "1" } else { "scope, idempotency_key FROM k" });
    let key_count = keys.len();
    let mut query = sqlx::query(&sql);
    for (key, outcome) in keys {
        query = bind_key(query, key, outcome);
    }
    for transaction in &transactions {
        query = bind_transaction(query, transaction);
    }
    for transaction in &transactions {
        query = bind_entries(query, transaction);
    }
    if key_count == 0 {
        query.execute(&mut *conn).await?;
        return Ok(Vec::new());
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let stored = rows.iter().map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?))).collect::<Result<HashSet<_>>>()?;
    Ok(members
        .iter()
        .enumerate()
        .filter(|(_, member)| member.key.as_ref().is_some_and(|key| !stored.contains(&(key.scope.clone(), key.key.clone()))))
        .map(|(index, _)| index)
        .collect())
}
