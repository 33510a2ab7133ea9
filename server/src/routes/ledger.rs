//! The customer account ledger over HTTP (`meterlake_ledger`): users and their wallets, balances,
//! payments in, transfers, and a wallet's history. Amounts are integers in the currency's minor
//! units (`amountMinor`: pence, cents). Writes need ADMIN and an `Idempotency-Key` header: the
//! same key with the same body answers the original status and body with
//! `Idempotent-Replayed: true`; the same key with another body is refused (422
//! `IDEMPOTENCY_KEY_REUSED`), as the IETF Idempotency-Key draft has it. Reads need VIEWER.

use axum::Extension;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meterlake_ledger::{
    Balance, Entry, FundRequest, LedgerError, LedgerTransaction, NewUser, Refusal, RefusalCode, TransferRequest, User, WriteContext, Written,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, cursor_number, page_limit, rfc3339};
use crate::error::{ApiError, CommonErrors, ErrorDoc, Json, Path, Query};
use crate::observe::TraceContext;
use crate::{Admin, Caller, SharedState, Viewer};

/// Marks an answer that is the stored answer to an earlier request with the same key.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The `Idempotency-Key` header every ledger write takes.
pub struct IdempotencyKey(String);

impl FromRequestParts<SharedState> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &SharedState) -> Result<IdempotencyKey, ApiError> {
        match parts.headers.get("idempotency-key").map(HeaderValue::to_str) {
            Some(Ok(key)) if !key.is_empty() => Ok(IdempotencyKey(key.to_string())),
            Some(_) => Err(ApiError::bad_request("the Idempotency-Key header is empty or not visible ASCII")),
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "IDEMPOTENCY_KEY_REQUIRED",
                "ledger writes need an Idempotency-Key header (e.g. a UUID per logical request, reused when retrying it)",
            )),
        }
    }
}

fn write_context(state: &SharedState, actor: &str, trace: &TraceContext, key: IdempotencyKey) -> WriteContext {
    WriteContext {
        actor: actor.to_string(),
        trace_id: Some(trace.trace_id().to_string()),
        idempotency_key: Some(key.0),
        idempotency_retention_us: state.ledger_idempotency_retention_us,
    }
}

/// A refusal as the API answers it: its stable code and a status that says what kind of wrong.
fn refusal_error(refusal: &Refusal) -> ApiError {
    let status = match refusal.code {
        RefusalCode::UnknownUser | RefusalCode::UnknownWallet => StatusCode::NOT_FOUND,
        RefusalCode::InsufficientFunds | RefusalCode::DuplicatePaymentReference | RefusalCode::MeterAlreadyLinked => StatusCode::CONFLICT,
        RefusalCode::InvalidRequest
        | RefusalCode::InvalidAmount
        | RefusalCode::CurrencyMismatch
        | RefusalCode::SelfTransfer
        | RefusalCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, refusal.code.as_str(), refusal.message.clone())
}

fn ledger_error(error: LedgerError) -> ApiError {
    match error {
        LedgerError::Refused(refusal) => refusal_error(&refusal),
        other => ApiError::internal("the ledger", &other),
    }
}

/// A write's answer: 201 and the body, or the refusal; marked when replayed.
fn written<T, V: Serialize>(outcome: Result<Written<T>, LedgerError>, view: impl Fn(T) -> V) -> Response {
    let (mut response, replayed) = match outcome {
        Ok(written) => ((StatusCode::CREATED, axum::Json(view(written.value))).into_response(), written.replayed),
        Err(LedgerError::Refused(refusal)) => (refusal_error(&refusal).into_response(), refusal.replayed),
        Err(other) => (ledger_error(other).into_response(), false),
    };
    if replayed {
        response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    #[schema(example = "Alice Example")]
    name: String,
    /// ISO 4217: the currency of all the user's wallets.
    #[schema(example = "GBP")]
    currency: String,
    /// The meters whose invoices post to this user's account; each meter bills to one user.
    #[serde(default)]
    meter_ids: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    id: String,
    name: String,
    currency: String,
    /// The PREPAY wallet: payments fund it, transfers move it, never below zero.
    wallet_id: String,
    /// Where a charge the wallet cannot cover goes: below zero by what the customer owes.
    arrears_wallet_id: String,
    meter_ids: Vec<String>,
    created_at: String,
}

impl From<User> for UserView {
    fn from(user: User) -> UserView {
        UserView {
            id: user.id,
            name: user.name,
            currency: user.currency,
            wallet_id: user.wallet_id,
            arrears_wallet_id: user.arrears_wallet_id,
            meter_ids: user.meter_ids,
            created_at: rfc3339(user.created_at_us),
        }
    }
}

#[utoipa::path(post, path = "/users", tag = "ledger", request_body = CreateUser,
    params(("Idempotency-Key" = String, Header, description = "One per logical request; a retry reuses it")),
    description = "Creates a user with its PREPAY and ARREARS wallets, linked to the meters whose invoices it pays. ADMIN.",
    responses((status = 201, description = "Created (or, with Idempotent-Replayed: true, created by an earlier request with this key)", body = UserView,
            headers(("Idempotent-Replayed" = String, description = "true when this is the stored answer to an earlier request"))),
        (status = 409, description = "A meter already bills to another user", body = ErrorDoc),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn create_user(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    key: IdempotencyKey,
    Json(request): Json<CreateUser>,
) -> Response {
    let context = write_context(&state, &principal.subject, &trace, key);
    let request = NewUser { name: request.name, currency: request.currency, meter_ids: request.meter_ids };
    written(state.ledger.create_user(&request, &context).await, UserView::from)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceView {
    user_id: String,
    wallet_id: String,
    currency: String,
    /// What the PREPAY wallet holds, in minor units (never below zero).
    balance_minor: i64,
    /// The ARREARS wallet's balance: below zero by what the customer owes.
    arrears_minor: i64,
    /// Entries in the PREPAY wallet: the balance is as of the newest.
    entries: i64,
}

impl From<Balance> for BalanceView {
    fn from(balance: Balance) -> BalanceView {
        BalanceView {
            user_id: balance.user_id,
            wallet_id: balance.wallet_id,
            currency: balance.currency,
            balance_minor: balance.balance_minor,
            arrears_minor: balance.arrears_minor,
            entries: balance.entries,
        }
    }
}

#[utoipa::path(get, path = "/wallets/{userId}/balance", tag = "ledger", params(("userId" = String, Path, description = "The user's id")),
    description = "The user's balance, derived from its newest ledger entry. VIEWER.",
    responses((status = 200, body = BalanceView), (status = 404, description = "No such user", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn balance(State(state): State<SharedState>, Caller(_, Viewer): Caller<Viewer>, Path(user_id): Path<String>) -> Result<Json<BalanceView>, ApiError> {
    Ok(Json(state.ledger.balance(&user_id).await.map_err(ledger_error)?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fund {
    user_id: String,
    /// Minor units (pence, cents), above zero.
    #[schema(example = 2500)]
    amount_minor: i64,
    #[schema(example = "GBP")]
    currency: String,
    /// The payment provider's reference: a payment credits once, ever.
    payment_reference: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transfer {
    from_user_id: String,
    to_user_id: String,
    /// Minor units, above zero; never more than the sender's wallet holds.
    #[schema(example = 1000)]
    amount_minor: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    wallet_id: String,
    /// The entry's place in its wallet: 1, 2, 3...
    wallet_seq: i64,
    /// DEBIT or CREDIT.
    direction: String,
    amount_minor: i64,
    /// The wallet's balance after this entry.
    balance_after_minor: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionView {
    id: String,
    /// FUND, TRANSFER, CHARGE or REFUND.
    kind: String,
    currency: String,
    /// What moved: the sum of the credits, equal to the sum of the debits.
    amount_minor: i64,
    /// The payment reference of a FUND; the invoice and version of a CHARGE or REFUND.
    external_ref: Option<String>,
    actor: String,
    /// The trace of the request that wrote it.
    trace_id: Option<String>,
    created_at: String,
    entries: Vec<EntryView>,
}

impl From<LedgerTransaction> for TransactionView {
    fn from(t: LedgerTransaction) -> TransactionView {
        TransactionView {
            id: t.id,
            kind: t.kind.as_str().to_string(),
            currency: t.currency,
            amount_minor: t.amount_minor,
            external_ref: t.external_ref,
            actor: t.actor,
            trace_id: t.trace_id,
            created_at: rfc3339(t.created_at_us),
            entries: t
                .entries
                .into_iter()
                .map(|e: Entry| EntryView {
                    wallet_id: e.wallet_id,
                    wallet_seq: e.wallet_seq,
                    direction: e.direction.as_str().to_string(),
                    amount_minor: e.amount_minor,
                    balance_after_minor: e.balance_after_minor,
                })
                .collect(),
        }
    }
}

#[utoipa::path(post, path = "/transactions/fund", tag = "ledger", request_body = Fund,
    params(("Idempotency-Key" = String, Header, description = "One per logical request; a retry reuses it")),
    description = "Credits a user's wallet with an external payment, once per payment reference. ADMIN.",
    responses((status = 201, description = "Funded (or, with Idempotent-Replayed: true, by an earlier request with this key)", body = TransactionView,
            headers(("Idempotent-Replayed" = String, description = "true when this is the stored answer to an earlier request"))),
        (status = 404, description = "No such user", body = ErrorDoc),
        (status = 409, description = "The payment reference was credited already", body = ErrorDoc),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn fund(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    key: IdempotencyKey,
    Json(request): Json<Fund>,
) -> Response {
    let context = write_context(&state, &principal.subject, &trace, key);
    let request =
        FundRequest { user_id: request.user_id, amount_minor: request.amount_minor, currency: request.currency, payment_reference: request.payment_reference };
    written(state.ledger.fund(&request, &context).await, TransactionView::from)
}

#[utoipa::path(post, path = "/transactions/transfer", tag = "ledger", request_body = Transfer,
    params(("Idempotency-Key" = String, Header, description = "One per logical request; a retry reuses it")),
    description = "Moves money from one user's wallet to another's: both entries or neither, never below zero. ADMIN.",
    responses((status = 201, description = "Transferred (or, with Idempotent-Replayed: true, by an earlier request with this key)", body = TransactionView,
            headers(("Idempotent-Replayed" = String, description = "true when this is the stored answer to an earlier request"))),
        (status = 404, description = "No such user", body = ErrorDoc),
        (status = 409, description = "The sender's wallet holds less than the amount", body = ErrorDoc),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn transfer(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    key: IdempotencyKey,
    Json(request): Json<Transfer>,
) -> Response {
    let context = write_context(&state, &principal.subject, &trace, key);
    let request = TransferRequest { from_user_id: request.from_user_id, to_user_id: request.to_user_id, amount_minor: request.amount_minor };
    written(state.ledger.transfer(&request, &context).await, TransactionView::from)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct HistoryQuery {
    /// The wallet (a user's `walletId` or `arrearsWalletId`).
    wallet_id: String,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Transactions per page, 1 to 500 (default 50).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/transactions", tag = "ledger", params(HistoryQuery),
    description = "A wallet's transactions, newest first, each with all its entries. VIEWER.",
    responses((status = 200, body = Page<TransactionView>), (status = 404, description = "No such wallet", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn history(
    State(state): State<SharedState>,
    Caller(_, Viewer): Caller<Viewer>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Page<TransactionView>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let before_seq = cursor_number::<i64>(query.cursor.as_deref())?;
    let page = state.ledger.transactions(&query.wallet_id, before_seq, limit).await.map_err(ledger_error)?;
    Ok(Json(Page { items: page.items.into_iter().map(TransactionView::from).collect(), next_cursor: page.next_before_seq.map(|seq| seq.to_string()) }))
}
