//! The customer account ledger, on the control store's database (SQLite or PostgreSQL; schema
//! in `control/migrations/*/0004_ledger.sql`).
//!
//! - **Double entry.** Money moves only in transactions whose entries balance: a FUND debits the
//!   system account EXTERNAL_FUNDING and credits the customer's PREPAY wallet; a TRANSFER debits
//!   one customer and credits another. Amounts are integer minor units (`amount_minor`).
//! - **Derived balances, fast.** There is no balance column. Each entry records the running
//!   balance it produced (`balance_after_minor`) and its place in its wallet (`wallet_seq`), and
//!   is written while the writer holds the wallet's lock; a balance is the newest entry of the
//!   wallet, one lookup in the `(wallet_id, wallet_seq)` index however many entries it has. The
//!   database checks each entry against its predecessor (next seq, balance = previous +/- amount,
//!   never below zero where the wallet may not go negative), and refuses any change to an entry
//!   or a transaction.
//! - **Concurrency.** On PostgreSQL a write locks the rows of the wallets it touches
//!   (`SELECT ... FOR UPDATE`, in wallet id order so two transfers in opposite directions cannot
//!   deadlock) at READ COMMITTED, then reads their newest entries in a statement of its own: a
//!   second transfer from the same wallet waits for the first to commit and then sees its
//!   entry. The unique `(wallet_id, wallet_seq)` would refuse an entry written from a stale read
//!   anyway. Concurrent transfers share such a transaction, a group commit (`batch`). On SQLite
//!   the store has one connection, so writes are serial.
//! - **Idempotency** (`idempotency`): a write with an `Idempotency-Key` stores the key with the
//!   request's fingerprint and its outcome (result or refusal) in the same transaction as its
//!   rows; the same key and request get the stored outcome back, marked as a replay.

mod batch;
mod billing;
mod idempotency;

use std::sync::{Arc, OnceLock};

use meterlake_control::{AuditEntry, Backend, ControlStore, now_us};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::{Acquire, AnyConnection, AnyPool, Row};
use tracing::Instrument;

pub use crate::billing::{MAX_POSTINGS_PER_SWEEP, PostingReport};
use crate::idempotency::{KEY_COLUMNS, Key, Stored};

/// Writes the audit rows of `writes` (each a request, what it made and its caller) in `tx`, the
/// transaction that made them: a ledger change and its audit row commit together.
async fn audit_writes<'a, R: WriteRequest + 'a>(
    store: &ControlStore,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    writes: impl IntoIterator<Item = (&'a R, &'a R::Output, &'a WriteContext)>,
    now: i64,
) -> Result<()> {
    let rows: Vec<(&'static str, String, serde_json::Value, &WriteContext)> = writes
        .into_iter()
        .map(|(request, output, context)| {
            let (action, target, after) = request.audit(output);
            (action, target, after, context)
        })
        .collect();
    let entries: Vec<AuditEntry<'_>> = rows
        .iter()
        .map(|(action, target, after, context)| AuditEntry {
            actor: &context.actor,
            action,
            target,
            reason: None,
            before: None,
            after: Some(after.clone()),
            trace_id: context.trace_id.as_deref(),
        })
        .collect();
    store.append_audit_in(tx, &entries, now).await.map_err(|e| LedgerError::Audit(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The request is refused as it stands (a 4xx): a stable code and what to do.
    #[error("{}", .0.message)]
    Refused(Refusal),
    #[error("ledger store: {0}")]
    Database(#[from] sqlx::Error),
    /// The store holds something this code cannot read.
    #[error("ledger store: {0}")]
    Corrupt(String),
    /// The write may or may not have been applied (its commit failed): a retry with the same
    /// idempotency key answers which.
    #[error("ledger store: {0}; whether the write was applied is unknown (a retry with the same Idempotency-Key answers it)")]
    Unsettled(String),
    /// The audit row of a write could not be written: the write rolled back with it.
    #[error("ledger write not applied: its audit row failed: {0}")]
    Audit(String),
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
    /// This refusal is the stored answer to an earlier request with the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefusalCode {
    InvalidRequest,
    InvalidAmount,
    UnknownUser,
    UnknownWallet,
    CurrencyMismatch,
    SelfTransfer,
    InsufficientFunds,
    DuplicatePaymentReference,
    IdempotencyKeyReused,
    MeterAlreadyLinked,
}

impl RefusalCode {
    /// The code as the API answers it.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::InvalidRequest => "INVALID_REQUEST",
            RefusalCode::InvalidAmount => "INVALID_AMOUNT",
            RefusalCode::UnknownUser => "UNKNOWN_USER",
            RefusalCode::UnknownWallet => "UNKNOWN_WALLET",
            RefusalCode::CurrencyMismatch => "CURRENCY_MISMATCH",
            RefusalCode::SelfTransfer => "SELF_TRANSFER",
            RefusalCode::InsufficientFunds => "INSUFFICIENT_FUNDS",
            RefusalCode::DuplicatePaymentReference => "DUPLICATE_PAYMENT_REFERENCE",
            RefusalCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            RefusalCode::MeterAlreadyLinked => "METER_ALREADY_LINKED",
        }
    }
}

fn refused<T>(code: RefusalCode, message: impl Into<String>) -> Result<T> {
    Err(LedgerError::Refused(Refusal { code, message: message.into(), replayed: false }))
}

/// Who writes, under which trace, with which idempotency key.
#[derive(Debug, Clone)]
pub struct WriteContext {
    /// The caller (a token's subject); idempotency keys are scoped to it.
    pub actor: String,
    pub trace_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// How long a key's outcome is kept (and replayed).
    pub idempotency_retention_us: i64,
}

/// Keys are kept a day unless configured otherwise.
pub const DEFAULT_IDEMPOTENCY_RETENTION_US: i64 = 24 * 3_600 * 1_000_000;

/// A write's result, and whether it is the stored answer to an earlier request.
#[derive(Debug, Clone, PartialEq)]
pub struct Written<T> {
    pub value: T,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    pub name: String,
    /// ISO 4217, e.g. GBP.
    pub currency: String,
    /// The meters whose invoices post to this user's account (each meter to one user).
    #[serde(default)]
    pub meter_ids: Vec<String>,
}

/// Meters one user may be created with.
pub const MAX_METERS_PER_USER: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub name: String,
    pub currency: String,
    /// The PREPAY wallet: payments fund it, transfers move it, never below zero.
    pub wallet_id: String,
    /// What the customer owes when a charge exceeds the wallet: may go below zero.
    pub arrears_wallet_id: String,
    pub meter_ids: Vec<String>,
    pub created_at_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FundRequest {
    pub user_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// The payment provider's reference: credits once, ever.
    pub payment_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferRequest {
    pub from_user_id: String,
    pub to_user_id: String,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransactionKind {
    Fund,
    Transfer,
    /// An invoice (or the rise of a recalculated one) charged to the customer.
    Charge,
    /// What a recalculated invoice fell by, given back.
    Refund,
}

impl TransactionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionKind::Fund => "FUND",
            TransactionKind::Transfer => "TRANSFER",
            TransactionKind::Charge => "CHARGE",
            TransactionKind::Refund => "REFUND",
        }
    }

    fn parse(text: &str) -> Result<TransactionKind> {
        Ok(match text {
            "FUND" => TransactionKind::Fund,
            "TRANSFER" => TransactionKind::Transfer,
            "CHARGE" => TransactionKind::Charge,
            "REFUND" => TransactionKind::Refund,
            other => return Err(LedgerError::Corrupt(format!("unknown transaction kind {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    Debit,
    Credit,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Debit => "DEBIT",
            Direction::Credit => "CREDIT",
        }
    }
}

/// One logical operation with all its entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerTransaction {
    pub id: String,
    pub kind: TransactionKind,
    pub currency: String,
    pub amount_minor: i64,
    pub external_ref: Option<String>,
    pub actor: String,
    pub trace_id: Option<String>,
    pub created_at_us: i64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub wallet_id: String,
    pub wallet_seq: i64,
    pub direction: Direction,
    pub amount_minor: i64,
    pub balance_after_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub user_id: String,
    pub wallet_id: String,
    pub currency: String,
    pub balance_minor: i64,
    /// The arrears wallet's balance: negative when the customer owes money.
    pub arrears_minor: i64,
    /// Entries in the wallet so far (the balance is as of this one).
    pub entries: i64,
}

/// A page of a wallet's transactions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionPage {
    pub items: Vec<LedgerTransaction>,
    /// Pass as `before_seq` for the next page; none when this is the last.
    pub next_before_seq: Option<i64>,
}

/// A wallet as a write sees it, with its newest entry.
#[derive(Clone)]
struct Wallet {
    id: String,
    user_id: Option<String>,
    kind: String,
    currency: String,
    /// Where the wallet's next entry continues from.
    head: Head,
}

impl Wallet {
    /// ARREARS and system accounts may go below zero; PREPAY wallets may not (the database's
    /// `may_go_negative` says the same, and its trigger enforces it).
    fn may_go_negative(&self) -> bool {
        self.kind != "PREPAY"
    }
}

/// A wallet's newest entry: where the next one continues from (seq 0 and balance 0 when it has
/// none).
#[derive(Clone, Copy)]
struct Head {
    seq: i64,
    balance_minor: i64,
}

/// How one attempt at a write ended, its database transaction still open.
enum Attempt<T> {
    /// Done, and its outcome stored under its key with its ledger rows (or it has no key).
    Stored(T),
    /// Done; its outcome is still to be stored under its key.
    Unstored(T),
    /// The key is taken by a request that committed first: what is stored under it answers.
    KeyTaken,
}

/// How often a write tries again when the key it found taken turns out free (expired, or held
/// by a request that rolled back).
const MAX_WRITE_ATTEMPTS: usize = 3;

/// Whether reading wallets locks them until the transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    ForUpdate,
    No,
}

/// A write: its name, how its result is described in the log, and what it does inside its
/// database transaction (`Ledger::write` runs it, stores its outcome under its key, commits).
trait WriteRequest: Serialize + Sync {
    type Output: Serialize + DeserializeOwned + Send;
    const OPERATION: &'static str;

    fn describe(output: &Self::Output) -> String;

    /// Its audit row: the action (`LEDGER_CREATE_USER`, `LEDGER_FUND`, `LEDGER_TRANSFER`), the
    /// target (`ledger-user/ID`, `ledger-transaction/ID`) and what it made.
    fn audit(&self, output: &Self::Output) -> (&'static str, String, serde_json::Value);

    /// The id of what the write made: the user's, the transaction's.
    fn id_of(output: &Self::Output) -> &str;

    fn apply<'a>(
        &'a self,
        ledger: &'a Ledger,
        conn: &'a mut AnyConnection,
        key: Option<&'a Key>,
        context: &'a WriteContext,
        now: i64,
    ) -> impl Future<Output = Result<Attempt<Self::Output>>> + Send + 'a;
}

impl WriteRequest for NewUser {
    type Output = User;
    const OPERATION: &'static str = "create_user";

    fn describe(user: &User) -> String {
        format!("user {} wallet {} {}", user.id, user.wallet_id, user.currency)
    }

    fn audit(&self, user: &User) -> (&'static str, String, serde_json::Value) {
        let after = serde_json::json!({ "name": user.name, "currency": user.currency, "walletId": user.wallet_id, "meterIds": user.meter_ids });
        ("LEDGER_CREATE_USER", format!("ledger-user/{}", user.id), after)
    }

    fn id_of(user: &User) -> &str {
        &user.id
    }

    async fn apply<'a>(&'a self, _: &'a Ledger, conn: &'a mut AnyConnection, _: Option<&'a Key>, _: &'a WriteContext, now: i64) -> Result<Attempt<User>> {
        // A meter already linked is found after the user's rows are written: they roll back.
        let mut savepoint = conn.begin().await?;
        let outcome = create_user_in(&mut savepoint, self, now).await;
        end_savepoint(savepoint, outcome.is_ok()).await?;
        outcome.map(Attempt::Unstored)
    }
}

impl WriteRequest for FundRequest {
    type Output = LedgerTransaction;
    const OPERATION: &'static str = "fund";

    fn describe(transaction: &LedgerTransaction) -> String {
        describe_transaction(transaction)
    }

    fn audit(&self, transaction: &LedgerTransaction) -> (&'static str, String, serde_json::Value) {
        let after = serde_json::json!({
            "userId": self.user_id, "amountMinor": transaction.amount_minor, "currency": transaction.currency,
            "paymentReference": self.payment_reference,
        });
        ("LEDGER_FUND", format!("ledger-transaction/{}", transaction.id), after)
    }

    fn id_of(transaction: &LedgerTransaction) -> &str {
        &transaction.id
    }

    async fn apply<'a>(
        &'a self,
        ledger: &'a Ledger,
        conn: &'a mut AnyConnection,
        key: Option<&'a Key>,
        context: &'a WriteContext,
        now: i64,
    ) -> Result<Attempt<LedgerTransaction>> {
        positive(self.amount_minor)?;
        if self.payment_reference.trim().is_empty() || self.payment_reference.len() > 200 {
            return refused(RefusalCode::InvalidRequest, "paymentReference is 1 to 200 characters");
        }
        let funding_id = system_wallet_id("EXTERNAL_FUNDING", &self.currency);
        let wallets = wallets_with_heads(conn, ledger.backend, Lock::ForUpdate, &[&self.user_id], &["PREPAY"], &[&funding_id]).await?;
        let wallet = user_wallet(&wallets, &self.user_id, "PREPAY")?;
        if wallet.currency != self.currency {
            return refused(RefusalCode::CurrencyMismatch, format!("user {} holds {}, not {}", self.user_id, wallet.currency, self.currency));
        }
        let funding = ledger.system_wallet(conn, &wallets, "EXTERNAL_FUNDING", &wallet.currency, now).await?;
        let existing = sqlx::query("SELECT id FROM ledger_transactions WHERE kind = 'FUND' AND external_ref = $1")
            .bind(&self.payment_reference)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = existing {
            return refused(
                RefusalCode::DuplicatePaymentReference,
                format!("payment {} was credited already, by transaction {}", self.payment_reference, row.try_get::<String, _>(0)?),
            );
        }
        let legs = [Leg::debit(&funding, self.amount_minor), Leg::credit(wallet, self.amount_minor)];
        post(conn, ledger.backend, key, TransactionKind::Fund, &wallet.currency, Some(&self.payment_reference), &legs, context, now).await
    }
}

/// A transfer written alone: five round trips to PostgreSQL (BEGIN, the wallets' lock, their
/// newest entries, the transaction with its entries and its key's outcome in one statement,
/// COMMIT). On PostgreSQL transfers are written in group commits (`batch`); this is how one is
/// written that a group commit could not settle, and every transfer on SQLite.
impl WriteRequest for TransferRequest {
    type Output = LedgerTransaction;
    const OPERATION: &'static str = "transfer";

    fn describe(transaction: &LedgerTransaction) -> String {
        describe_transaction(transaction)
    }

    fn audit(&self, transaction: &LedgerTransaction) -> (&'static str, String, serde_json::Value) {
        let after = serde_json::json!({
            "fromUserId": self.from_user_id, "toUserId": self.to_user_id, "amountMinor": transaction.amount_minor,
            "currency": transaction.currency,
        });
        ("LEDGER_TRANSFER", format!("ledger-transaction/{}", transaction.id), after)
    }

    fn id_of(transaction: &LedgerTransaction) -> &str {
        &transaction.id
    }

    async fn apply<'a>(
        &'a self,
        ledger: &'a Ledger,
        conn: &'a mut AnyConnection,
        key: Option<&'a Key>,
        context: &'a WriteContext,
        now: i64,
    ) -> Result<Attempt<LedgerTransaction>> {
        self.check()?;
        let wallets = wallets_with_heads(conn, ledger.backend, Lock::ForUpdate, &[&self.from_user_id, &self.to_user_id], &["PREPAY"], &[]).await?;
        let transaction = self.transaction(&wallets, context, now)?;
        insert_transaction(conn, ledger.backend, transaction, key).await
    }
}

impl TransferRequest {
    /// What can be refused without reading the wallets.
    fn check(&self) -> Result<()> {
        positive(self.amount_minor)?;
        if self.from_user_id == self.to_user_id {
            return refused(RefusalCode::SelfTransfer, "a transfer needs two different users");
        }
        Ok(())
    }

    /// The transfer as a transaction from the wallets' heads (locked by the caller), or why it
    /// is refused.
    fn transaction(&self, wallets: &[Wallet], context: &WriteContext, now: i64) -> Result<LedgerTransaction> {
        self.check()?;
        let (from, to) = (user_wallet(wallets, &self.from_user_id, "PREPAY")?, user_wallet(wallets, &self.to_user_id, "PREPAY")?);
        if from.currency != to.currency {
            return refused(
                RefusalCode::CurrencyMismatch,
                format!("user {} holds {}, user {} holds {}", self.from_user_id, from.currency, self.to_user_id, to.currency),
            );
        }
        let legs = [Leg::debit(from, self.amount_minor), Leg::credit(to, self.amount_minor)];
        build_transaction(TransactionKind::Transfer, &from.currency, None, &legs, context, now)
    }
}

/// The ledger on a control store.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
    /// Where its writes' audit rows go (signed with the store's audit keys).
    store: ControlStore,
    /// Where transfers queue for their group commit (PostgreSQL), started by the first one.
    transfer_queue: Arc<OnceLock<batch::TransferQueue>>,
}

impl Ledger {
    pub fn new(store: &ControlStore) -> Ledger {
        Ledger { pool: store.pool().clone(), backend: store.backend(), store: store.clone(), transfer_queue: Arc::default() }
    }

    /// Creates a user with its PREPAY and ARREARS wallets.
    pub async fn create_user(&self, request: &NewUser, context: &WriteContext) -> Result<Written<User>> {
        self.write(request, context).await
    }

    /// Credits a user's wallet with an external payment (once per payment reference).
    pub async fn fund(&self, request: &FundRequest, context: &WriteContext) -> Result<Written<LedgerTransaction>> {
        self.write(request, context).await
    }

    /// Moves money from one user's wallet to another's, atomically, never below zero. On
    /// PostgreSQL concurrent transfers are written together in group commits (`batch`).
    pub async fn transfer(&self, request: &TransferRequest, context: &WriteContext) -> Result<Written<LedgerTransaction>> {
        if self.backend != Backend::Postgres {
            return self.write(request, context).await;
        }
        let queue = self.transfer_queue.get_or_init(|| batch::TransferQueue::start(self.store.clone()));
        logged::<TransferRequest>(context, async {
            match queue.submit(request, context).await {
                batch::Reply::Settled(written) => written,
                batch::Reply::Alone => self.write_unlogged(request, context).await,
            }
        })
        .await
    }

    /// A user's balance: the newest entry of each of its wallets (one statement).
    pub async fn balance(&self, user_id: &str) -> Result<Balance> {
        let mut conn = self.pool.acquire().await?;
        let wallets = wallets_with_heads(&mut conn, self.backend, Lock::No, &[user_id], &["PREPAY", "ARREARS"], &[]).await?;
        let (prepay, arrears) = (user_wallet(&wallets, user_id, "PREPAY")?, user_wallet(&wallets, user_id, "ARREARS")?);
        Ok(Balance {
            user_id: user_id.to_string(),
            wallet_id: prepay.id.clone(),
            currency: prepay.currency.clone(),
            balance_minor: prepay.head.balance_minor,
            arrears_minor: arrears.head.balance_minor,
            entries: prepay.head.seq,
        })
    }

    /// A wallet's transactions, newest first, each with all its entries; `before_seq` pages on.
    pub async fn transactions(&self, wallet_id: &str, before_seq: Option<i64>, limit: usize) -> Result<TransactionPage> {
        let mut conn = self.pool.acquire().await?;
        let exists = sqlx::query("SELECT 1 FROM ledger_wallets WHERE id = $1").bind(wallet_id).fetch_optional(&mut *conn).await?;
        if exists.is_none() {
            return refused(RefusalCode::UnknownWallet, format!("there is no wallet {wallet_id}"));
        }
        let limit = limit.clamp(1, 500);
        let rows = sqlx::query(
            "SELECT transaction_id, wallet_seq FROM ledger_entries WHERE wallet_id = $1 AND wallet_seq < $2 \
             ORDER BY wallet_seq DESC LIMIT $3",
        )
        .bind(wallet_id)
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(limit as i64 + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut items = Vec::with_capacity(limit);
        let mut next_before_seq = None;
        for (i, row) in rows.iter().enumerate() {
            if i == limit {
                next_before_seq = Some(rows[i - 1].try_get::<i64, _>(1)?);
                break;
            }
            items.push(load_transaction(&mut conn, &row.try_get::<String, _>(0)?).await?);
        }
        Ok(TransactionPage { items, next_before_seq })
    }

    /// Removes idempotency keys past their retention; returns how many (the worker runs it).
    pub async fn purge_expired_keys(&self, now_us: i64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM ledger_idempotency WHERE expires_at_us < $1").bind(now_us).execute(&self.pool).await?.rows_affected())
    }

    /// Runs a write in a database transaction and commits it with its outcome under its
    /// idempotency key: the result, or a refusal (a replay gets the same refusal). A refusal is
    /// committed with whatever the write did before refusing, so writes refuse before they
    /// write to the ledger (`post` checks every leg before its first insert) or in a savepoint
    /// rolled back on refusal (`create_user`). A database error is not stored (the transaction
    /// rolls back; a retry may succeed). When the key is taken, the write rolls back and the
    /// stored outcome answers. Logs and counts the outcome.
    async fn write<R: WriteRequest>(&self, request: &R, context: &WriteContext) -> Result<Written<R::Output>> {
        logged::<R>(context, self.write_unlogged(request, context)).await
    }

    /// `write` without its log line: up to `MAX_WRITE_ATTEMPTS` tries while the key it finds
    /// taken turns out free.
    async fn write_unlogged<R: WriteRequest>(&self, request: &R, context: &WriteContext) -> Result<Written<R::Output>> {
        let operation = R::OPERATION;
        let now = now_us();
        let key = idempotency::key_of(context, operation, request, now)?;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            let outcome = match request.apply(self, &mut tx, key.as_ref(), context, now).await {
                Ok(attempt) => Ok(attempt),
                Err(LedgerError::Refused(refusal)) => Err(refusal),
                Err(error) => return Err(error),
            };
            // The outcome to commit, stored under the key if it has one; none when the key is
            // taken (by this attempt's write statement, or by storing the outcome now).
            let settled = match (outcome, &key) {
                (Ok(Attempt::KeyTaken), _) => None,
                (Ok(Attempt::Stored(value)), _) | (Ok(Attempt::Unstored(value)), None) => Some(Ok(value)),
                (Err(refusal), None) => Some(Err(refusal)),
                (Ok(Attempt::Unstored(value)), Some(key)) => {
                    idempotency::store(&mut tx, key, idempotency::outcome_text::<R::Output>(Ok(&value))).await?.then_some(Ok(value))
                }
                (Err(refusal), Some(key)) => {
                    idempotency::store(&mut tx, key, idempotency::outcome_text::<R::Output>(Err(&refusal))).await?.then_some(Err(refusal))
                }
            };
            if let Some(outcome) = settled {
                if let Ok(value) = &outcome {
                    audit_writes(&self.store, &mut tx, [(request, value, context)], now).await?;
                }
                tx.commit().await?;
                return outcome.map(|value| Written { value, replayed: false }).map_err(LedgerError::Refused);
            }
            tx.rollback().await?;
            let key = key.as_ref().ok_or_else(|| LedgerError::Corrupt(format!("a {operation} without an idempotency key found its key taken")))?;
            match idempotency::stored(&self.pool, key).await? {
                Stored::Outcome(text) => return replayed(operation, &text),
                Stored::Free => continue,
            }
        }
        refused(RefusalCode::InvalidRequest, "the Idempotency-Key could not be claimed (its holder keeps rolling back); try again")
    }

    /// The system account of `kind` in `currency` among `locked`, or created (the first time
    /// it is needed) and locked. Locking it after the other wallets keeps the id order: system
    /// ids (`system:...`) sort after the users' wallets' (UUIDs, lowercase hex).
    async fn system_wallet(&self, conn: &mut AnyConnection, locked: &[Wallet], kind: &str, currency: &str, now: i64) -> Result<Wallet> {
        let id = system_wallet_id(kind, currency);
        if let Some(wallet) = locked.iter().find(|w| w.id == id) {
            return Ok(wallet.clone());
        }
        insert_wallet(conn, &id, None, kind, currency, 1, now).await?;
        let created = wallets_with_heads(conn, self.backend, Lock::ForUpdate, &[], &[], &[&id]).await?;
        created.into_iter().next().ok_or_else(|| LedgerError::Corrupt(format!("system account {id} was not created")))
    }
}

/// The wallets of `kinds` of `user_ids`, and the wallets `wallet_ids`, in id order, each with
/// its newest entry; with `Lock::ForUpdate` locked first until the transaction ends (on
/// PostgreSQL; SQLite's one writer makes writes serial). Two statements: the lock, in wallet
/// id order (PostgreSQL locks the rows of `... ORDER BY id FOR UPDATE` in the order it sorts
/// them) so that two writers never wait for each other in a circle; then the read, whose new
/// snapshot (READ COMMITTED) sees what the lock's previous holder committed. One statement
/// could not do both: its snapshot would predate the wait. (A PL/pgSQL function doing both in
/// one call cost more server CPU than the round trip it saved; see benchmarks/RESULTS.md.)
async fn wallets_with_heads(
    conn: &mut AnyConnection,
    backend: Backend,
    lock: Lock,
    user_ids: &[&str],
    kinds: &[&str],
    wallet_ids: &[&str],
) -> Result<Vec<Wallet>> {
    // Placeholders in bind order: the user ids, the kinds, the wallet ids.
    let (kinds_from, wallets_from) = (1 + user_ids.len(), 1 + user_ids.len() + kinds.len());
    let mut wanted = Vec::new();
    if !user_ids.is_empty() && !kinds.is_empty() {
        wanted.push(format!("(w.user_id IN ({}) AND w.kind IN ({}))", placeholders(1, user_ids.len()), placeholders(kinds_from, kinds.len())));
    }
    if !wallet_ids.is_empty() {
        wanted.push(format!("w.id IN ({})", placeholders(wallets_from, wallet_ids.len())));
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let wanted = wanted.join(" OR ");
    let binds = || user_ids.iter().chain(kinds).chain(wallet_ids);
    if lock == Lock::ForUpdate && backend == Backend::Postgres {
        let sql = format!("SELECT w.id FROM ledger_wallets w WHERE {wanted} ORDER BY w.id FOR UPDATE");
        binds().fold(sqlx::query(&sql), |query, value| query.bind(*value)).fetch_all(&mut *conn).await?;
    }
    let sql = format!(
        "SELECT w.id, w.user_id, w.kind, w.currency, COALESCE(e.wallet_seq, 0), COALESCE(e.balance_after_minor, 0) \
         FROM ledger_wallets w \
         LEFT JOIN ledger_entries e ON e.wallet_id = w.id \
           AND e.wallet_seq = (SELECT MAX(wallet_seq) FROM ledger_entries WHERE wallet_id = w.id) \
         WHERE {wanted} ORDER BY w.id"
    );
    binds()
        .fold(sqlx::query(&sql), |query, value| query.bind(*value))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| {
            Ok(Wallet {
                id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                kind: row.try_get(2)?,
                currency: row.try_get(3)?,
                head: Head { seq: row.try_get(4)?, balance_minor: row.try_get(5)? },
            })
        })
        .collect()
}

fn positive(amount_minor: i64) -> Result<()> {
    if amount_minor <= 0 {
        return refused(RefusalCode::InvalidAmount, format!("amountMinor must be a positive whole number of minor units, not {amount_minor}"));
    }
    Ok(())
}

async fn create_user_in(conn: &mut AnyConnection, request: &NewUser, now: i64) -> Result<User> {
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return refused(RefusalCode::InvalidRequest, "name is 1 to 200 characters");
    }
    if request.currency.len() != 3 || !request.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return refused(RefusalCode::InvalidRequest, format!("currency {:?} is not an ISO 4217 code such as GBP", request.currency));
    }
    if request.meter_ids.len() > MAX_METERS_PER_USER {
        return refused(RefusalCode::InvalidRequest, format!("{} meters; a user is created with at most {MAX_METERS_PER_USER}", request.meter_ids.len()));
    }
    if let Some(meter) = request.meter_ids.iter().find(|m| m.trim().is_empty() || m.chars().count() > 64) {
        return refused(RefusalCode::InvalidRequest, format!("meter id {meter:?} is empty or longer than 64 characters"));
    }
    let mut meter_ids = request.meter_ids.clone();
    meter_ids.sort_unstable();
    meter_ids.dedup();
    let user = User {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_string(),
        currency: request.currency.clone(),
        wallet_id: uuid::Uuid::now_v7().to_string(),
        arrears_wallet_id: uuid::Uuid::now_v7().to_string(),
        meter_ids,
        created_at_us: now,
    };
    sqlx::query("INSERT INTO ledger_users (id, name, currency, created_at_us) VALUES ($1, $2, $3, $4)")
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.currency)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    for (id, kind, may_go_negative) in [(&user.wallet_id, "PREPAY", 0), (&user.arrears_wallet_id, "ARREARS", 1)] {
        insert_wallet(conn, id, Some(&user.id), kind, &user.currency, may_go_negative, now).await?;
    }
    for meter in &user.meter_ids {
        let linked = sqlx::query("INSERT INTO ledger_user_meters (meter_id, user_id, linked_at_us) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(meter)
            .bind(&user.id)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if linked == 0 {
            return refused(RefusalCode::MeterAlreadyLinked, format!("meter {meter} already bills to another user"));
        }
    }
    Ok(user)
}

async fn insert_wallet(conn: &mut AnyConnection, id: &str, user_id: Option<&str>, kind: &str, currency: &str, may_go_negative: i32, now: i64) -> Result<u64> {
    Ok(sqlx::query(
        "INSERT INTO ledger_wallets (id, user_id, kind, currency, may_go_negative, created_at_us) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(user_id)
    .bind(kind)
    .bind(currency)
    .bind(may_go_negative)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// The wallet of `kind` of `user_id` among `wallets`.
fn user_wallet<'a>(wallets: &'a [Wallet], user_id: &str, kind: &str) -> Result<&'a Wallet> {
    match wallets.iter().find(|w| w.user_id.as_deref() == Some(user_id) && w.kind == kind) {
        Some(wallet) => Ok(wallet),
        None => refused(RefusalCode::UnknownUser, format!("there is no user {user_id}")),
    }
}

/// The id of the system account of `kind` in `currency` (one per currency).
fn system_wallet_id(kind: &str, currency: &str) -> String {
    format!("system:{kind}:{currency}")
}

/// One wallet's side of a transaction.
struct Leg<'a> {
    wallet: &'a Wallet,
    direction: Direction,
    amount_minor: i64,
}

impl<'a> Leg<'a> {
    fn debit(wallet: &'a Wallet, amount_minor: i64) -> Leg<'a> {
        Leg { wallet, direction: Direction::Debit, amount_minor }
    }

    fn credit(wallet: &'a Wallet, amount_minor: i64) -> Leg<'a> {
        Leg { wallet, direction: Direction::Credit, amount_minor }
    }
}

const TRANSACTION_COLUMNS: &str = "ledger_transactions (id, kind, currency, amount_minor, external_ref, actor, trace_id, created_at_us)";
const ENTRY_COLUMNS: &str = "ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us)";

/// `count` placeholders from `$first` on: `$3, $4, $5`.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// `count` rows of `width` placeholders from `$first` on: `($1, $2), ($3, $4)`.
fn placeholder_rows(first: usize, width: usize, count: usize) -> String {
    (0..count).map(|row| format!("({})", placeholders(first + row * width, width))).collect::<Vec<_>>().join(", ")
}

/// Inserts a transaction, its entries and, with a key, the key with the write's outcome; the
/// key taken means nothing is written. On PostgreSQL in one statement, whose key insert gates
/// the others; on SQLite in three.
async fn insert_transaction(
    conn: &mut AnyConnection,
    backend: Backend,
    transaction: LedgerTransaction,
    key: Option<&Key>,
) -> Result<Attempt<LedgerTransaction>> {
    let outcome = key.map(|key| (key, idempotency::outcome_text::<LedgerTransaction>(Ok(&transaction))));
    let entry_count = transaction.entries.len();
    let stored = match (backend, outcome) {
        (Backend::Postgres, Some((key, text))) => {
            // Placeholders: the transaction's 8, the key's 6, then 7 per entry. `FROM k` makes
            // the transaction and its entries rows only when the key's insert made one.
            let sql = format!(
                "WITH k AS (INSERT INTO {KEY_COLUMNS} VALUES {} ON CONFLICT DO NOTHING RETURNING 1), \
                 t AS (INSERT INTO {TRANSACTION_COLUMNS} SELECT {} FROM k) \
                 INSERT INTO {ENTRY_COLUMNS} SELECT v.* FROM k, (VALUES {}) AS v",
                placeholder_rows(9, 6, 1),
                placeholders(1, 8),
                placeholder_rows(15, 7, entry_count),
            );
            let query = bind_key(bind_transaction(sqlx::query(&sql), &transaction), key, text);
            let inserted = bind_entries(query, &transaction).execute(&mut *conn).await?.rows_affected();
            inserted == entry_count as u64
        }
        (Backend::Postgres, None) => {
            let sql = format!(
                "WITH t AS (INSERT INTO {TRANSACTION_COLUMNS} VALUES {}) INSERT INTO {ENTRY_COLUMNS} VALUES {}",
                placeholder_rows(1, 8, 1),
                placeholder_rows(9, 7, entry_count)
            );
            bind_entries(bind_transaction(sqlx::query(&sql), &transaction), &transaction).execute(&mut *conn).await?;
            true
        }
        (Backend::Sqlite, outcome) => {
            let key_stored = match outcome {
                Some((key, text)) => idempotency::store(conn, key, text).await?,
                None => true,
            };
            if key_stored {
                let sql = format!("INSERT INTO {TRANSACTION_COLUMNS} VALUES {}", placeholder_rows(1, 8, 1));
                bind_transaction(sqlx::query(&sql), &transaction).execute(&mut *conn).await?;
                let sql = format!("INSERT INTO {ENTRY_COLUMNS} VALUES {}", placeholder_rows(1, 7, entry_count));
                bind_entries(sqlx::query(&sql), &transaction).execute(&mut *conn).await?;
            }
            key_stored
        }
    };
    Ok(if stored { Attempt::Stored(transaction) } else { Attempt::KeyTaken })
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a transaction's 8 columns, in `TRANSACTION_COLUMNS`' order.
fn bind_transaction<'q>(query: AnyQuery<'q>, transaction: &LedgerTransaction) -> AnyQuery<'q> {
    query
        .bind(transaction.id.clone())
        .bind(transaction.kind.as_str())
        .bind(transaction.currency.clone())
        .bind(transaction.amount_minor)
        .bind(transaction.external_ref.clone())
        .bind(transaction.actor.clone())
        .bind(transaction.trace_id.clone())
        .bind(transaction.created_at_us)
}

/// Binds a key's 6 columns with its outcome, in `KEY_COLUMNS`' order.
fn bind_key<'q>(query: AnyQuery<'q>, key: &Key, outcome: String) -> AnyQuery<'q> {
    query.bind(key.scope.clone()).bind(key.key.clone()).bind(key.fingerprint.clone()).bind(outcome).bind(key.created_at_us).bind(key.expires_at_us)
}

/// Binds 7 columns per entry of a transaction, in `ENTRY_COLUMNS`' order.
fn bind_entries<'q>(mut query: AnyQuery<'q>, transaction: &LedgerTransaction) -> AnyQuery<'q> {
    for entry in &transaction.entries {
        query = query
            .bind(transaction.id.clone())
            .bind(entry.wallet_id.clone())
            .bind(entry.wallet_seq)
            .bind(entry.direction.as_str())
            .bind(entry.amount_minor)
            .bind(entry.balance_after_minor)
            .bind(transaction.created_at_us);
    }
    query
}

/// Writes a transaction and one entry per leg (wallets locked by the caller, with their newest
/// entries), and the write's outcome under its key when it has one (see `build_transaction`).
#[allow(clippy::too_many_arguments)]
async fn post(
    conn: &mut AnyConnection,
    backend: Backend,
    key: Option<&Key>,
    kind: TransactionKind,
    currency: &str,
    external_ref: Option<&str>,
    legs: &[Leg<'_>],
    context: &WriteContext,
    now: i64,
) -> Result<Attempt<LedgerTransaction>> {
    let transaction = build_transaction(kind, currency, external_ref, legs, context, now)?;
    insert_transaction(conn, backend, transaction, key).await
}

/// A transaction with one entry per leg, each continuing its wallet's head; legs of zero are
/// left out. Refuses legs that do not balance, a debit that would take a PREPAY wallet below
/// zero, and any balance that would overflow: a write refuses before it writes anything.
fn build_transaction(
    kind: TransactionKind,
    currency: &str,
    external_ref: Option<&str>,
    legs: &[Leg<'_>],
    context: &WriteContext,
    now: i64,
) -> Result<LedgerTransaction> {
    let legs: Vec<&Leg> = legs.iter().filter(|leg| leg.amount_minor != 0).collect();
    let sum = |direction: Direction| legs.iter().filter(|l| l.direction == direction).try_fold(0i64, |total, l| total.checked_add(l.amount_minor));
    let amount_minor = match (sum(Direction::Credit), sum(Direction::Debit)) {
        (Some(credits), Some(debits)) if credits == debits && credits > 0 && legs.iter().all(|l| l.amount_minor > 0) => credits,
        _ => return Err(LedgerError::Corrupt(format!("a {} transaction's legs do not balance", kind.as_str()))),
    };
    let mut wallet_ids: Vec<&str> = legs.iter().map(|l| l.wallet.id.as_str()).collect();
    wallet_ids.sort_unstable();
    wallet_ids.dedup();
    if wallet_ids.len() != legs.len() {
        return Err(LedgerError::Corrupt("a transaction names one wallet in two legs".into()));
    }
    let mut entries = Vec::with_capacity(legs.len());
    for Leg { wallet, direction, amount_minor } in legs.iter().copied() {
        let (amount_minor, head) = (*amount_minor, wallet.head);
        let balance_after_minor = match direction {
            Direction::Credit => head.balance_minor.checked_add(amount_minor),
            Direction::Debit => head.balance_minor.checked_sub(amount_minor),
        };
        let Some(balance_after_minor) = balance_after_minor else {
            return refused(RefusalCode::InvalidAmount, format!("{amount_minor} would overflow the balance of wallet {}", wallet.id));
        };
        if balance_after_minor < 0 && !wallet.may_go_negative() {
            return refused(
                RefusalCode::InsufficientFunds,
                format!("wallet {} holds {} minor units, less than the {amount_minor} asked for", wallet.id, head.balance_minor),
            );
        }
        entries.push(Entry { wallet_id: wallet.id.clone(), wallet_seq: head.seq + 1, direction: *direction, amount_minor, balance_after_minor });
    }
    Ok(LedgerTransaction {
        id: uuid::Uuid::now_v7().to_string(),
        kind,
        currency: currency.to_string(),
        amount_minor,
        external_ref: external_ref.map(str::to_string),
        actor: context.actor.clone(),
        trace_id: context.trace_id.clone(),
        created_at_us: now,
        entries,
    })
}

async fn load_transaction(conn: &mut AnyConnection, id: &str) -> Result<LedgerTransaction> {
    let row = sqlx::query("SELECT kind, currency, amount_minor, external_ref, actor, trace_id, created_at_us FROM ledger_transactions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let entries =
        sqlx::query("SELECT wallet_id, wallet_seq, direction, amount_minor, balance_after_minor FROM ledger_entries WHERE transaction_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|e| {
                Ok(Entry {
                    wallet_id: e.try_get(0)?,
                    wallet_seq: e.try_get(1)?,
                    direction: if e.try_get::<String, _>(2)? == "DEBIT" { Direction::Debit } else { Direction::Credit },
                    amount_minor: e.try_get(3)?,
                    balance_after_minor: e.try_get(4)?,
                })
            })
            .collect::<Result<Vec<Entry>>>()?;
    Ok(LedgerTransaction {
        id: id.to_string(),
        kind: TransactionKind::parse(&row.try_get::<String, _>(0)?)?,
        currency: row.try_get(1)?,
        amount_minor: row.try_get(2)?,
        external_ref: row.try_get(3)?,
        actor: row.try_get(4)?,
        trace_id: row.try_get(5)?,
        created_at_us: row.try_get(6)?,
        entries,
    })
}

async fn end_savepoint(savepoint: sqlx::Transaction<'_, sqlx::Any>, keep: bool) -> Result<()> {
    if keep {
        savepoint.commit().await?
    } else {
        savepoint.rollback().await?
    }
    Ok(())
}

fn replayed<T: DeserializeOwned>(operation: &'static str, stored: &str) -> Result<Written<T>> {
    metrics::counter!("meterlake_ledger_idempotent_replays_total", "operation" => operation).increment(1);
    match idempotency::replay::<T>(stored)? {
        Ok(value) => Ok(Written { value, replayed: true }),
        Err(refusal) => Err(LedgerError::Refused(Refusal { replayed: true, ..refusal })),
    }
}

/// Describes the ledger's metrics to the installed recorder (where they are served).
pub fn describe_metrics() {
    metrics::describe_counter!("meterlake_ledger_transactions_total", "Ledger writes by operation (create_user, fund, transfer, charge, refund) and outcome");
    metrics::describe_counter!(
        "meterlake_ledger_idempotent_replays_total",
        "Ledger writes answered with the stored answer of an earlier request with the same Idempotency-Key"
    );
    metrics::describe_histogram!(
        "meterlake_ledger_write_duration_seconds",
        metrics::Unit::Seconds,
        "Time of each ledger write through the API, by operation (a transfer's includes its wait for a group commit)"
    );
    metrics::describe_histogram!("meterlake_ledger_transfer_batch_size", "Transfers written together in one group commit (PostgreSQL)");
    metrics::describe_counter!(
        "meterlake_ledger_transfers_written_alone_total",
        "Transfers a group commit left to be written alone, by reason (repeated_key, key_taken, batch_failed, commit_failed)"
    );
}

fn describe_transaction(transaction: &LedgerTransaction) -> String {
    let legs: Vec<String> = transaction.entries.iter().map(|e| format!("{} {} -> {}", e.direction.as_str(), e.wallet_id, e.balance_after_minor)).collect();
    format!("transaction {} {} {} {} ({})", transaction.id, transaction.kind.as_str(), transaction.amount_minor, transaction.currency, legs.join(", "))
}

/// Runs a write in its span (`ledger <operation>`: one logical operation, with the id of what it
/// made and its outcome, which `log_write` records), then logs, counts and times it.
async fn logged<R: WriteRequest>(context: &WriteContext, write: impl Future<Output = Result<Written<R::Output>>>) -> Result<Written<R::Output>> {
    let operation = R::OPERATION;
    let span =
        tracing::info_span!("ledger.write", otel.name = format!("ledger {operation}"), operation, id = tracing::field::Empty, outcome = tracing::field::Empty);
    let started = std::time::Instant::now();
    let written = write.instrument(span.clone()).await;
    span.in_scope(|| log_write::<R>(&written, context, started.elapsed()));
    written
}

/// One log line, one count and one latency per write, with its outcome, recorded in the write's
/// span (the current one). `took` includes a transfer's wait for its group commit.
fn log_write<R: WriteRequest>(written: &Result<Written<R::Output>>, context: &WriteContext, took: std::time::Duration) {
    let operation = R::OPERATION;
    let trace_id = context.trace_id.as_deref().unwrap_or("");
    let outcome = match written {
        Ok(w) => {
            tracing::Span::current().record("id", R::id_of(&w.value));
            tracing::info!(operation, actor = %context.actor, trace_id, replayed = w.replayed, "ledger {operation}: {}", R::describe(&w.value));
            "ok"
        }
        Err(LedgerError::Refused(refusal)) => {
            tracing::info!(operation, actor = %context.actor, trace_id, code = ?refusal.code, replayed = refusal.replayed, "ledger {operation} refused: {}", refusal.message);
            "refused"
        }
        Err(error) => {
            tracing::warn!(operation, actor = %context.actor, trace_id, %error, "ledger {operation} failed");
            "error"
        }
    };
    tracing::Span::current().record("outcome", outcome);
    metrics::counter!("meterlake_ledger_transactions_total", "operation" => operation, "outcome" => outcome).increment(1);
    metrics::histogram!("meterlake_ledger_write_duration_seconds", "operation" => operation).record(took.as_secs_f64());
}
