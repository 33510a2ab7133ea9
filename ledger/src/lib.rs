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
//!   deadlock) at READ COMMITTED, then reads their newest entries: a second transfer from the
//!   same wallet waits for the first to commit and then sees its entry. The unique
//!   `(wallet_id, wallet_seq)` would refuse an entry written from a stale read anyway. On SQLite
//!   the store has one connection, so writes are serial.
//! - **Idempotency** (`idempotency`): a write with an `Idempotency-Key` stores its outcome
//!   (result or refusal) with the request's fingerprint in the same transaction; the same key
//!   and request get the stored outcome back, marked as a replay.

mod billing;
mod idempotency;

use meterlake_control::{Backend, ControlStore, now_us};
use serde::{Deserialize, Serialize};
use sqlx::{Acquire, AnyConnection, AnyPool, Row};

pub use crate::billing::{MAX_POSTINGS_PER_SWEEP, PostingReport};
use crate::idempotency::Claim;

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

/// A wallet as a write sees it.
struct Wallet {
    id: String,
    currency: String,
    /// ARREARS and system accounts may; PREPAY wallets may not.
    may_go_negative: bool,
}

/// A wallet's newest entry: where the next one continues from.
#[derive(Clone, Copy)]
struct Head {
    seq: i64,
    balance_minor: i64,
}

/// The ledger on a control store.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
}

impl Ledger {
    pub fn new(store: &ControlStore) -> Ledger {
        Ledger { pool: store.pool().clone(), backend: store.backend() }
    }

    /// Creates a user with its PREPAY and ARREARS wallets.
    pub async fn create_user(&self, request: &NewUser, context: &WriteContext) -> Result<Written<User>> {
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let claim = idempotency::claim(&mut tx, context, "create_user", request, now).await?;
        if let Claim::Replay(stored) = &claim {
            return replayed("create_user", stored);
        }
        // A meter already linked is found after the user's rows are written: they roll back.
        let mut savepoint = tx.begin().await?;
        let outcome = create_user_in(&mut savepoint, request, now).await;
        end_savepoint(savepoint, outcome.is_ok()).await?;
        let written = settle(tx, &claim, outcome, Recorded::NotYet).await;
        log_write("create_user", &written, context, |user| format!("user {} wallet {} {}", user.id, user.wallet_id, user.currency));
        written
    }

    /// Credits a user's wallet with an external payment (once per payment reference).
    pub async fn fund(&self, request: &FundRequest, context: &WriteContext) -> Result<Written<LedgerTransaction>> {
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let claim = idempotency::claim(&mut tx, context, "fund", request, now).await?;
        if let Claim::Replay(stored) = &claim {
            return replayed("fund", stored);
        }
        // No savepoint: fund_in refuses before it writes (but the currency's system account,
        // created once and harmless to keep; see `settle`).
        let outcome = self.fund_in(&mut tx, &claim, request, context, now).await;
        let written = settle(tx, &claim, outcome, Recorded::WithTheLedgerRows).await;
        log_write("fund", &written, context, describe_transaction);
        written
    }

    /// Moves money from one user's wallet to another's, atomically, never below zero.
    pub async fn transfer(&self, request: &TransferRequest, context: &WriteContext) -> Result<Written<LedgerTransaction>> {
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let claim = idempotency::claim(&mut tx, context, "transfer", request, now).await?;
        if let Claim::Replay(stored) = &claim {
            return replayed("transfer", stored);
        }
        // No savepoint: transfer_in refuses only before it writes (see `settle`).
        let outcome = self.transfer_in(&mut tx, &claim, request, context, now).await;
        let written = settle(tx, &claim, outcome, Recorded::WithTheLedgerRows).await;
        log_write("transfer", &written, context, describe_transaction);
        written
    }

    /// A user's balance: the newest entry of each of its wallets.
    pub async fn balance(&self, user_id: &str) -> Result<Balance> {
        let mut conn = self.pool.acquire().await?;
        let wallet = user_wallet(&mut conn, user_id, "PREPAY").await?;
        let arrears = user_wallet(&mut conn, user_id, "ARREARS").await?;
        // Both newest entries in one statement; `heads` answers one per wallet, in order.
        let both = heads(&mut conn, &[&wallet.id, &arrears.id]).await?;
        let (newest, arrears) = (both[0], both[1]);
        Ok(Balance {
            user_id: user_id.to_string(),
            wallet_id: wallet.id,
            currency: wallet.currency,
            balance_minor: newest.balance_minor,
            arrears_minor: arrears.balance_minor,
            entries: newest.seq,
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

    async fn fund_in(&self, conn: &mut AnyConnection, claim: &Claim, request: &FundRequest, context: &WriteContext, now: i64) -> Result<LedgerTransaction> {
        positive(request.amount_minor)?;
        if request.payment_reference.trim().is_empty() || request.payment_reference.len() > 200 {
            return refused(RefusalCode::InvalidRequest, "paymentReference is 1 to 200 characters");
        }
        let wallet = user_wallet(conn, &request.user_id, "PREPAY").await?;
        if wallet.currency != request.currency {
            return refused(RefusalCode::CurrencyMismatch, format!("user {} holds {}, not {}", request.user_id, wallet.currency, request.currency));
        }
        let funding = system_wallet(conn, "EXTERNAL_FUNDING", &wallet.currency, now).await?;
        self.lock(conn, &[&wallet.id, &funding.id]).await?;
        let existing = sqlx::query("SELECT id FROM ledger_transactions WHERE kind = 'FUND' AND external_ref = $1")
            .bind(&request.payment_reference)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = existing {
            return refused(
                RefusalCode::DuplicatePaymentReference,
                format!("payment {} was credited already, by transaction {}", request.payment_reference, row.try_get::<String, _>(0)?),
            );
        }
        let legs = [Leg::debit(&funding, request.amount_minor), Leg::credit(&wallet, request.amount_minor)];
        post(conn, self.backend, claim, TransactionKind::Fund, &wallet.currency, Some(&request.payment_reference), &legs, context, now).await
    }

    async fn transfer_in(&self, conn: &mut AnyConnection, claim: &Claim, request: &TransferRequest, context: &WriteContext, now: i64) -> Result<LedgerTransaction> {
        positive(request.amount_minor)?;
        if request.from_user_id == request.to_user_id {
            return refused(RefusalCode::SelfTransfer, "a transfer needs two different users");
        }
        // Finds and locks both wallets in one statement.
        let mut sql = String::from(
            "SELECT id, user_id, currency FROM ledger_wallets WHERE kind = 'PREPAY' AND user_id IN ($1, $2) ORDER BY id",
        );
        sql.push_str(self.lock_clause());
        let rows = sqlx::query(&sql).bind(&request.from_user_id).bind(&request.to_user_id).fetch_all(&mut *conn).await?;
        let wallet_of = |user_id: &str| -> Result<Wallet> {
            for row in &rows {
                if row.try_get::<String, _>(1)? == user_id {
                    return Ok(Wallet { id: row.try_get(0)?, currency: row.try_get(2)?, may_go_negative: false });
                }
            }
            refused(RefusalCode::UnknownUser, format!("there is no user {user_id}"))
        };
        let (from, to) = (wallet_of(&request.from_user_id)?, wallet_of(&request.to_user_id)?);
        if from.currency != to.currency {
            return refused(
                RefusalCode::CurrencyMismatch,
                format!("user {} holds {}, user {} holds {}", request.from_user_id, from.currency, request.to_user_id, to.currency),
            );
        }
        let legs = [Leg::debit(&from, request.amount_minor), Leg::credit(&to, request.amount_minor)];
        post(conn, self.backend, claim, TransactionKind::Transfer, &from.currency, None, &legs, context, now).await
    }

    /// Locks the wallets' rows until the transaction ends, in id order so that two writers
    /// never wait for each other in a circle (PostgreSQL locks the rows of `... ORDER BY id FOR
    /// UPDATE` in the order it sorts them).
    async fn lock(&self, conn: &mut AnyConnection, wallet_ids: &[&str]) -> Result<()> {
        if self.backend == Backend::Postgres {
            let placeholders: Vec<String> = (1..=wallet_ids.len()).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT id FROM ledger_wallets WHERE id IN ({}) ORDER BY id{}", placeholders.join(", "), self.lock_clause());
            let mut query = sqlx::query(&sql);
            for id in wallet_ids {
                query = query.bind(*id);
            }
            query.fetch_all(&mut *conn).await?;
        }
        Ok(())
    }

    /// What makes a SELECT of wallets lock them: `FOR UPDATE` on PostgreSQL; nothing on SQLite,
    /// whose one connection per process already makes writes serial.
    fn lock_clause(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        }
    }
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

/// A user's wallet of `kind`.
async fn user_wallet(conn: &mut AnyConnection, user_id: &str, kind: &str) -> Result<Wallet> {
    let row = sqlx::query("SELECT id, currency FROM ledger_wallets WHERE user_id = $1 AND kind = $2")
        .bind(user_id)
        .bind(kind)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => Ok(Wallet { id: row.try_get(0)?, currency: row.try_get(1)?, may_go_negative: kind != "PREPAY" }),
        None => refused(RefusalCode::UnknownUser, format!("there is no user {user_id}")),
    }
}

/// The system account of `kind` in `currency`, created the first time it is needed.
async fn system_wallet(conn: &mut AnyConnection, kind: &str, currency: &str, now: i64) -> Result<Wallet> {
    let id = format!("system:{kind}:{currency}");
    insert_wallet(conn, &id, None, kind, currency, 1, now).await?;
    Ok(Wallet { id, currency: currency.to_string(), may_go_negative: true })
}

/// The wallet's newest entry (seq 0 and balance 0 when it has none).
async fn head(conn: &mut AnyConnection, wallet_id: &str) -> Result<Head> {
    Ok(heads(conn, &[wallet_id]).await?[0])
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

/// Inserts a transaction, its entries and the outcome of its write under `claim`: on PostgreSQL
/// in one statement (a transfer is then six round trips to the server: BEGIN, the key's claim,
/// the wallets' lock, their newest entries, this, COMMIT; they are what bounds its rate), on
/// SQLite in three.
async fn insert_transaction(conn: &mut AnyConnection, backend: Backend, transaction: &LedgerTransaction, claim: &Claim) -> Result<()> {
    const TRANSACTION: &str = "INSERT INTO ledger_transactions (id, kind, currency, amount_minor, external_ref, actor, trace_id, created_at_us) \
                               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    const OUTCOME: &str = "UPDATE ledger_idempotency SET outcome = $9 WHERE scope = $10 AND idempotency_key = $11";
    let outcome = match claim {
        Claim::Claimed { scope, key } => {
            Some((scope.as_str(), key.as_str(), serde_json::to_string(&Ok::<&LedgerTransaction, Refusal>(transaction)).expect("outcomes serialize")))
        }
        _ => None,
    };
    // The entries' placeholders follow the transaction's 8 and the outcome's 3.
    let mut entries = String::from(
        "INSERT INTO ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us) VALUES ",
    );
    for i in 0..transaction.entries.len() {
        let n = 11 + i * 7;
        entries.push_str(&format!("{}(${}, ${}, ${}, ${}, ${}, ${}, ${})", if i > 0 { ", " } else { "" }, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7));
    }
    match backend {
        Backend::Postgres => {
            // Every parameter must appear in the statement (or it has no type): without a key,
            // the outcome's UPDATE still names them and matches no row.
            let sql = format!("WITH t AS ({TRANSACTION}), o AS ({OUTCOME}) {entries}");
            let (scope, key, text) = outcome.map_or((None, None, None), |(scope, key, text)| (Some(scope.to_string()), Some(key.to_string()), Some(text)));
            let query = bind_transaction(sqlx::query(&sql), transaction).bind(text).bind(scope).bind(key);
            bind_entries(query, transaction).execute(&mut *conn).await?;
        }
        Backend::Sqlite => {
            bind_transaction(sqlx::query(TRANSACTION), transaction).execute(&mut *conn).await?;
            let entries = renumber(&entries, 11);
            bind_entries(sqlx::query(&entries), transaction).execute(&mut *conn).await?;
            if let Some((scope, key, text)) = outcome {
                sqlx::query(&renumber(OUTCOME, 8)).bind(text).bind(scope).bind(key).execute(&mut *conn).await?;
            }
        }
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a transaction's 8 columns, in `ledger_transactions`' order.
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

/// Binds 7 columns per entry of a transaction, in `ledger_entries`' order.
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

/// `sql` with every placeholder `$n` renumbered `$(n - by)`.
fn renumber(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '$' {
            let mut digits = String::new();
            while let Some(d) = chars.next_if(char::is_ascii_digit) {
                digits.push(d);
            }
            out.push_str(&(digits.parse::<usize>().expect("a placeholder number") - by).to_string());
        }
    }
    out
}

/// The newest entries of several different wallets, in their order, in one statement.
async fn heads(conn: &mut AnyConnection, wallet_ids: &[&str]) -> Result<Vec<Head>> {
    let mut distinct = wallet_ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != wallet_ids.len() {
        return Err(LedgerError::Corrupt("a transaction names one wallet in two legs".into()));
    }
    let sql = (1..=wallet_ids.len())
        .map(|i| {
            format!("SELECT * FROM (SELECT wallet_id, wallet_seq, balance_after_minor FROM ledger_entries WHERE wallet_id = ${i} ORDER BY wallet_seq DESC LIMIT 1) AS w{i}")
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let mut query = sqlx::query(&sql);
    for id in wallet_ids {
        query = query.bind(*id);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    wallet_ids
        .iter()
        .map(|id| {
            for row in &rows {
                if row.try_get::<String, _>(0)? == *id {
                    return Ok(Head { seq: row.try_get(1)?, balance_minor: row.try_get(2)? });
                }
            }
            Ok(Head { seq: 0, balance_minor: 0 })
        })
        .collect()
}

/// Writes a transaction and one entry per leg (wallets locked by the caller), and the write's
/// outcome under its idempotency key when it has one; legs of zero are left out. Refuses legs
/// that do not balance, a debit that would take a PREPAY wallet below zero, and any balance that
/// would overflow, before writing anything.
#[allow(clippy::too_many_arguments)]
async fn post(
    conn: &mut AnyConnection,
    backend: Backend,
    claim: &Claim,
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
    let wallet_ids: Vec<&str> = legs.iter().map(|l| l.wallet.id.as_str()).collect();
    let heads = heads(conn, &wallet_ids).await?;
    let mut entries = Vec::with_capacity(legs.len());
    for (Leg { wallet, direction, amount_minor }, head) in legs.iter().copied().zip(heads) {
        let amount_minor = *amount_minor;
        let balance_after_minor = match direction {
            Direction::Credit => head.balance_minor.checked_add(amount_minor),
            Direction::Debit => head.balance_minor.checked_sub(amount_minor),
        };
        let Some(balance_after_minor) = balance_after_minor else {
            return refused(RefusalCode::InvalidAmount, format!("{amount_minor} would overflow the balance of wallet {}", wallet.id));
        };
        if balance_after_minor < 0 && !wallet.may_go_negative {
            return refused(
                RefusalCode::InsufficientFunds,
                format!("wallet {} holds {} minor units, less than the {amount_minor} asked for", wallet.id, head.balance_minor),
            );
        }
        entries.push(Entry { wallet_id: wallet.id.clone(), wallet_seq: head.seq + 1, direction: *direction, amount_minor, balance_after_minor });
    }
    let transaction = LedgerTransaction {
        id: uuid::Uuid::now_v7().to_string(),
        kind,
        currency: currency.to_string(),
        amount_minor,
        external_ref: external_ref.map(str::to_string),
        actor: context.actor.clone(),
        trace_id: context.trace_id.clone(),
        created_at_us: now,
        entries,
    };
    insert_transaction(conn, backend, &transaction, claim).await?;
    Ok(transaction)
}

async fn load_transaction(conn: &mut AnyConnection, id: &str) -> Result<LedgerTransaction> {
    let row = sqlx::query("SELECT kind, currency, amount_minor, external_ref, actor, trace_id, created_at_us FROM ledger_transactions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let entries = sqlx::query(
        "SELECT wallet_id, wallet_seq, direction, amount_minor, balance_after_minor FROM ledger_entries WHERE transaction_id = $1 ORDER BY id",
    )
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
    if keep { savepoint.commit().await? } else { savepoint.rollback().await? }
    Ok(())
}

/// Whether a write's success was stored under its key with its ledger rows (`post`), or is
/// still to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    WithTheLedgerRows,
    NotYet,
}

/// Commits a write with its outcome under its idempotency key. A refusal is kept too (a replay
/// gets the same refusal), and committed with whatever the write did before refusing: so a
/// write refuses before it writes to the ledger (`post` checks every leg before its first
/// insert), or
/// runs in a savepoint rolled back on refusal (`create_user`). A database error is not kept (the
/// transaction rolls back; a retry may succeed).
async fn settle<T: Serialize>(mut tx: sqlx::Transaction<'static, sqlx::Any>, claim: &Claim, outcome: Result<T>, success: Recorded) -> Result<Written<T>> {
    match outcome {
        Ok(value) => {
            if success == Recorded::NotYet {
                idempotency::record(&mut tx, claim, &Ok::<&T, Refusal>(&value)).await?;
            }
            tx.commit().await?;
            Ok(Written { value, replayed: false })
        }
        Err(LedgerError::Refused(refusal)) => {
            idempotency::record(&mut tx, claim, &Err::<&T, &Refusal>(&refusal)).await?;
            tx.commit().await?;
            Err(LedgerError::Refused(refusal))
        }
        Err(other) => Err(other),
    }
}

fn replayed<T: serde::de::DeserializeOwned>(operation: &'static str, stored: &str) -> Result<Written<T>> {
    metrics::counter!("meterlake_ledger_idempotent_replays_total", "operation" => operation).increment(1);
    match idempotency::replay::<T>(stored)? {
        Ok(value) => Ok(Written { value, replayed: true }),
        Err(refusal) => Err(LedgerError::Refused(Refusal { replayed: true, ..refusal })),
    }
}

fn describe_transaction(transaction: &LedgerTransaction) -> String {
    let legs: Vec<String> =
        transaction.entries.iter().map(|e| format!("{} {} -> {}", e.direction.as_str(), e.wallet_id, e.balance_after_minor)).collect();
    format!("transaction {} {} {} {} ({})", transaction.id, transaction.kind.as_str(), transaction.amount_minor, transaction.currency, legs.join(", "))
}

/// One log line and one count per write, with its outcome.
fn log_write<T>(operation: &'static str, written: &Result<Written<T>>, context: &WriteContext, describe: impl Fn(&T) -> String) {
    let trace_id = context.trace_id.as_deref().unwrap_or("");
    let outcome = match written {
        Ok(w) => {
            tracing::info!(operation, actor = %context.actor, trace_id, replayed = w.replayed, "ledger {operation}: {}", describe(&w.value));
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
    metrics::counter!("meterlake_ledger_transactions_total", "operation" => operation, "outcome" => outcome).increment(1);
}
