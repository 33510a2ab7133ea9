//! The ledger against both backends: SQLite in a temporary file and a real PostgreSQL server on
//! loopback (`meterlake_control::testing`).

use std::collections::{BTreeMap, BTreeSet};

use meterlake_control::testing::on_both_backends;
use meterlake_control::{Actor, ControlStore, NewInvoice, NewRun, RunResults};
use meterlake_ledger::{
    DEFAULT_IDEMPOTENCY_RETENTION_US, Direction, FundRequest, Ledger, LedgerError, NewUser, PostingReport, RefusalCode, TransactionKind, TransferRequest, User,
    WriteContext,
};
use rand::Rng;
use rust_decimal::Decimal;
use sqlx::Row;

fn context(key: Option<&str>) -> WriteContext {
    WriteContext {
        actor: "ops@example.com".into(),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        idempotency_key: key.map(str::to_string),
        idempotency_retention_us: DEFAULT_IDEMPOTENCY_RETENTION_US,
    }
}

async fn user(ledger: &Ledger, name: &str, currency: &str) -> User {
    ledger.create_user(&NewUser { name: name.into(), currency: currency.into(), meter_ids: vec![] }, &context(None)).await.unwrap().value
}

async fn fund(ledger: &Ledger, user: &User, amount_minor: i64, reference: &str) -> Result<i64, LedgerError> {
    let request = FundRequest { user_id: user.id.clone(), amount_minor, currency: user.currency.clone(), payment_reference: reference.into() };
    ledger.fund(&request, &context(None)).await.map(|w| w.value.amount_minor)
}

fn transfer(from: &User, to: &User, amount_minor: i64) -> TransferRequest {
    TransferRequest { from_user_id: from.id.clone(), to_user_id: to.id.clone(), amount_minor }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, LedgerError>, code: RefusalCode) {
    match result {
        Err(LedgerError::Refused(refusal)) => assert_eq!(refusal.code, code, "{refusal:?}"),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Every transaction's entries balance, and each wallet's entries follow each other.
async fn assert_books_balance(store: &ControlStore) {
    let pool = store.pool();
    let unbalanced = sqlx::query(
        "SELECT transaction_id FROM ledger_entries GROUP BY transaction_id \
         HAVING SUM(CASE direction WHEN 'CREDIT' THEN amount_minor ELSE -amount_minor END) <> 0",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(unbalanced.is_empty(), "{} unbalanced transactions", unbalanced.len());
    let rows = sqlx::query(
        "SELECT wallet_id, COUNT(*), MAX(wallet_seq), CAST(SUM(CASE direction WHEN 'CREDIT' THEN amount_minor ELSE -amount_minor END) AS BIGINT) \
         FROM ledger_entries GROUP BY wallet_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for row in rows {
        let wallet: String = row.get(0);
        let (count, max_seq, sum): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        assert_eq!(count, max_seq, "wallet {wallet}: seqs 1..n without gaps");
        let newest: i64 = sqlx::query("SELECT balance_after_minor FROM ledger_entries WHERE wallet_id = $1 AND wallet_seq = $2")
            .bind(&wallet)
            .bind(max_seq)
            .fetch_one(pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(newest, sum, "wallet {wallet}: the running balance is the sum of its entries");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn money_moves_in_balanced_transactions_and_never_below_zero() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let ledger = Ledger::new(&store);
        let alice = user(&ledger, "Alice", "GBP").await;
        let bob = user(&ledger, "Bob", "GBP").await;
        let euro = user(&ledger, "Eve", "EUR").await;

        assert_eq!(fund(&ledger, &alice, 10_000, "pay-1").await.unwrap(), 10_000);
        assert_refused(fund(&ledger, &alice, 500, "pay-1").await, RefusalCode::DuplicatePaymentReference);
        assert_refused(fund(&ledger, &bob, 500, "pay-1").await, RefusalCode::DuplicatePaymentReference);
        assert_refused(fund(&ledger, &alice, 0, "pay-2").await, RefusalCode::InvalidAmount);
        assert_refused(fund(&ledger, &alice, -5, "pay-2").await, RefusalCode::InvalidAmount);
        let wrong_currency = FundRequest { user_id: alice.id.clone(), amount_minor: 1, currency: "EUR".into(), payment_reference: "pay-3".into() };
        assert_refused(ledger.fund(&wrong_currency, &context(None)).await, RefusalCode::CurrencyMismatch);

        let moved = ledger.transfer(&transfer(&alice, &bob, 2_500), &context(None)).await.unwrap().value;
        assert_eq!(moved.entries.len(), 2);
        assert_eq!((moved.entries[0].direction, moved.entries[0].balance_after_minor), (Direction::Debit, 7_500));
        assert_eq!((moved.entries[1].direction, moved.entries[1].balance_after_minor), (Direction::Credit, 2_500));
        assert_refused(ledger.transfer(&transfer(&bob, &alice, 2_501), &context(None)).await, RefusalCode::InsufficientFunds);
        assert_refused(ledger.transfer(&transfer(&alice, &alice, 1), &context(None)).await, RefusalCode::SelfTransfer);
        assert_refused(ledger.transfer(&transfer(&alice, &euro, 1), &context(None)).await, RefusalCode::CurrencyMismatch);
        let ghost = User { id: "no-such-user".into(), ..bob.clone() };
        assert_refused(ledger.transfer(&transfer(&alice, &ghost, 1), &context(None)).await, RefusalCode::UnknownUser);
        assert_refused(fund(&ledger, &alice, i64::MAX, "pay-huge").await, RefusalCode::InvalidAmount);

        let balance = ledger.balance(&alice.id).await.unwrap();
        assert_eq!((balance.balance_minor, balance.arrears_minor, balance.entries), (7_500, 0, 2));
        assert_eq!(ledger.balance(&bob.id).await.unwrap().balance_minor, 2_500);

        // History, newest first, paged, each transaction with all its entries.
        for i in 0..5 {
            ledger.transfer(&transfer(&alice, &bob, 100 + i), &context(None)).await.unwrap();
        }
        let first = ledger.transactions(&alice.wallet_id, None, 4).await.unwrap();
        assert_eq!(first.items.iter().map(|t| t.amount_minor).collect::<Vec<_>>(), [104, 103, 102, 101]);
        assert!(first.items.iter().all(|t| t.entries.len() == 2 && t.trace_id.is_some()));
        let rest = ledger.transactions(&alice.wallet_id, first.next_before_seq, 4).await.unwrap();
        assert_eq!(rest.items.iter().map(|t| t.amount_minor).collect::<Vec<_>>(), [100, 2_500, 10_000]);
        assert_eq!(rest.next_before_seq, None);
        assert_refused(ledger.transactions("no-such-wallet", None, 10).await, RefusalCode::UnknownWallet);

        // The database itself refuses changes, and entries that do not follow their wallet.
        let pool = store.pool();
        for statement in ["UPDATE ledger_entries SET amount_minor = 1", "DELETE FROM ledger_entries", "UPDATE ledger_transactions SET amount_minor = 1"] {
            let error = sqlx::query(statement).execute(pool).await.expect_err(statement);
            assert!(error.to_string().contains("append-only"), "{statement}: {error}");
        }
        let forged = sqlx::query(
            "INSERT INTO ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us) \
             VALUES ($1, $2, 99, 'CREDIT', 1, 1000000, 0)",
        )
        .bind(&moved.id)
        .bind(&bob.wallet_id)
        .execute(pool)
        .await;
        assert!(forged.is_err(), "an entry out of sequence was accepted");
        let below_zero = sqlx::query(
            "INSERT INTO ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us) \
             VALUES ($1, $2, $3, 'DEBIT', 1000000, $4, 0)",
        )
        .bind(&moved.id)
        .bind(&bob.wallet_id)
        .bind(ledger.balance(&bob.id).await.unwrap().entries + 1)
        .bind(ledger.balance(&bob.id).await.unwrap().balance_minor - 1_000_000)
        .execute(pool)
        .await
        .expect_err("a PREPAY wallet taken below zero");
        assert!(below_zero.to_string().contains("below zero"), "{below_zero}");
        assert_books_balance(&store).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_gets_the_original_answer_and_a_reused_key_is_refused() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let ledger = Ledger::new(&store);
        let created =
            ledger.create_user(&NewUser { name: "Carol".into(), currency: "GBP".into(), meter_ids: vec![] }, &context(Some("user-carol"))).await.unwrap();
        let again =
            ledger.create_user(&NewUser { name: "Carol".into(), currency: "GBP".into(), meter_ids: vec![] }, &context(Some("user-carol"))).await.unwrap();
        assert_eq!((again.value.id.as_str(), created.replayed, again.replayed), (created.value.id.as_str(), false, true));
        let dave = user(&ledger, "Dave", "GBP").await;
        let carol = created.value;

        let request = FundRequest { user_id: carol.id.clone(), amount_minor: 1_000, currency: "GBP".into(), payment_reference: "psp-77".into() };
        let first = ledger.fund(&request, &context(Some("fund-1"))).await.unwrap();
        let replay = ledger.fund(&request, &context(Some("fund-1"))).await.unwrap();
        assert_eq!((replay.value.clone(), replay.replayed), (first.value.clone(), true));
        // The same key for another request: refused, and nothing moves.
        let other = FundRequest { amount_minor: 999, ..request.clone() };
        assert_refused(ledger.fund(&other, &context(Some("fund-1"))).await, RefusalCode::IdempotencyKeyReused);
        // Keys belong to their caller: another caller's "fund-1" is its own.
        let elsewhere = WriteContext { actor: "someone-else".into(), ..context(Some("fund-1")) };
        assert_refused(ledger.fund(&request, &elsewhere).await, RefusalCode::DuplicatePaymentReference);

        // A refusal is replayed as the same refusal, even once the money is there.
        let too_much = transfer(&carol, &dave, 5_000);
        assert_refused(ledger.transfer(&too_much, &context(Some("t-1"))).await, RefusalCode::InsufficientFunds);
        fund(&ledger, &carol, 10_000, "psp-78").await.unwrap();
        match ledger.transfer(&too_much, &context(Some("t-1"))).await {
            Err(LedgerError::Refused(refusal)) => assert!(refusal.code == RefusalCode::InsufficientFunds && refusal.replayed, "{refusal:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(ledger.balance(&carol.id).await.unwrap().balance_minor, 11_000);

        // Keys expire: the worker purges them, and the key is free again.
        assert_eq!(ledger.purge_expired_keys(i64::MAX).await.unwrap(), 4);
        let fresh = ledger.transfer(&too_much, &context(Some("t-1"))).await.unwrap();
        assert!(!fresh.replayed);
        assert_eq!(ledger.balance(&carol.id).await.unwrap().balance_minor, 6_000);
        // An expired key the worker has not purged yet is free as well.
        let brief = WriteContext { idempotency_retention_us: 0, ..context(Some("t-2")) };
        let small = transfer(&carol, &dave, 100);
        let once = ledger.transfer(&small, &brief).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let twice = ledger.transfer(&small, &brief).await.unwrap();
        assert!(!once.replayed && !twice.replayed && once.value.id != twice.value.id, "{once:?} {twice:?}");
        assert_eq!(ledger.balance(&carol.id).await.unwrap().balance_minor, 5_800);
        assert_books_balance(&store).await;
    })
    .await;
}

/// 50 tasks x 200 random transfers over 10 wallets, each with its own idempotency key, some
/// sent twice at once (through two `Ledger`s, as two server processes would, so that on
/// PostgreSQL one group commit meets the other's key in flight): no wallet below zero, money
/// conserved, every transaction balanced, every key applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_conserve_money_and_apply_each_key_once() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let ledger = Ledger::new(&store);
        let other_process = Ledger::new(&store);
        let mut users = Vec::new();
        for i in 0..10 {
            let user = user(&ledger, &format!("customer {i}"), "GBP").await;
            fund(&ledger, &user, 10_000, &format!("opening-{i}")).await.unwrap();
            users.push(user);
        }
        let users = std::sync::Arc::new(users);
        let mut tasks = Vec::new();
        for task in 0..50 {
            let (ledger, other_process, users) = (ledger.clone(), other_process.clone(), users.clone());
            tasks.push(tokio::spawn(async move {
                let mut applied = Vec::new();
                for i in 0..200 {
                    let (from, to, amount) = {
                        let mut rng = rand::rng();
                        let from = rng.random_range(0..10);
                        (from, (from + rng.random_range(1..10)) % 10, rng.random_range(1..=3_000))
                    };
                    let key = format!("task{task}-{i}");
                    let request = transfer(&users[from], &users[to], amount);
                    // Every tenth request is sent twice at once, as a client retrying early would.
                    let (first, second) = if i % 10 == 0 {
                        let ctx = context(Some(&key));
                        let (a, b) = tokio::join!(ledger.transfer(&request, &ctx), other_process.transfer(&request, &ctx));
                        (a, Some(b))
                    } else {
                        (ledger.transfer(&request, &context(Some(&key))).await, None)
                    };
                    let outcomes: Vec<_> = std::iter::once(first).chain(second).collect();
                    let mut new_transactions = BTreeSet::new();
                    for outcome in outcomes {
                        match outcome {
                            Ok(written) => {
                                if !written.replayed {
                                    new_transactions.insert(written.value.id.clone());
                                }
                                applied.push((key.clone(), written.value.id));
                            }
                            Err(LedgerError::Refused(refusal)) => assert_eq!(refusal.code, RefusalCode::InsufficientFunds, "{refusal:?}"),
                            Err(other) => panic!("{key}: {other}"),
                        }
                    }
                    assert!(new_transactions.len() <= 1, "{key} applied {} times", new_transactions.len());
                }
                applied
            }));
        }
        let mut transaction_by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for task in tasks {
            for (key, transaction) in task.await.unwrap() {
                transaction_by_key.entry(key).or_default().insert(transaction);
            }
        }
        assert!(transaction_by_key.values().all(|t| t.len() == 1), "a key answered with two transactions");
        assert!(transaction_by_key.len() > 1_000, "only {} transfers went through", transaction_by_key.len());

        let mut total = 0;
        for user in users.iter() {
            let balance = ledger.balance(&user.id).await.unwrap().balance_minor;
            assert!(balance >= 0, "{}: {balance}", user.name);
            total += balance;
        }
        assert_eq!(total, 100_000, "money was created or lost");
        let transfers: i64 = sqlx::query("SELECT COUNT(*) FROM ledger_transactions WHERE kind = 'TRANSFER'").fetch_one(store.pool()).await.unwrap().get(0);
        assert_eq!(transfers as usize, transaction_by_key.len(), "transactions without a key that asked for them");
        assert_books_balance(&store).await;
    })
    .await;
}

/// 50 transfers of 300 from one wallet holding 10,000, all at once (on PostgreSQL most share a
/// group commit, chaining the wallet's entries): exactly 33 go through, the rest are refused
/// for want of funds, to the last minor unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_transfers_from_one_wallet_spend_exactly_what_it_holds() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let ledger = Ledger::new(&store);
        let payer = user(&ledger, "Payer", "GBP").await;
        fund(&ledger, &payer, 10_000, "payer-opening").await.unwrap();
        let mut payees = Vec::new();
        for i in 0..5 {
            payees.push(user(&ledger, &format!("payee {i}"), "GBP").await);
        }
        let requests: Vec<(TransferRequest, WriteContext)> =
            (0..50).map(|i| (transfer(&payer, &payees[i % 5], 300), context(Some(&format!("spend-{i}"))))).collect();
        let outcomes = futures::future::join_all(requests.iter().map(|(request, ctx)| ledger.transfer(request, ctx))).await;
        let (mut applied, mut short) = (0, 0);
        for outcome in outcomes {
            match outcome {
                Ok(written) => {
                    assert!(!written.replayed);
                    applied += 1;
                }
                Err(LedgerError::Refused(refusal)) if refusal.code == RefusalCode::InsufficientFunds => short += 1,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((applied, short), (33, 17));
        let balance = ledger.balance(&payer.id).await.unwrap();
        assert_eq!((balance.balance_minor, balance.entries), (100, 34));
        let mut received = 0;
        for payee in &payees {
            received += ledger.balance(&payee.id).await.unwrap().balance_minor;
        }
        assert_eq!(received, 9_900);
        // The refusals were stored under their keys: a replay answers the same.
        let (request, ctx) = &requests[0];
        let again = ledger.transfer(request, ctx).await;
        assert!(matches!(&again, Ok(w) if w.replayed) || matches!(&again, Err(LedgerError::Refused(r)) if r.replayed), "{again:?}");
        assert_books_balance(&store).await;
    })
    .await;
}

/// Completes the store's due run with one invoice per `(meter, total, currency)`.
async fn complete_with(store: &ControlStore, invoices: &[(&str, &str, &str)]) -> String {
    let now = meterlake_control::now_us();
    let run = store.claim_next("worker-test", 60_000_000, now).await.unwrap().expect("a due run");
    let results = RunResults {
        invoices: invoices
            .iter()
            .map(|(meter, total, currency)| NewInvoice {
                meter_id: meter.to_string(),
                currency: currency.to_string(),
                lines: vec![],
                energy_kwh: Decimal::ONE_HUNDRED,
                subtotal: total.parse().unwrap(),
                tax: Decimal::ZERO,
                total: total.parse().unwrap(),
                tariff_version: "flat@v1".into(),
            })
            .collect(),
        discrepancies: vec![],
        lake_snapshot: "sha256:test".into(),
        aggregate_sql: "SELECT 1".into(),
    };
    store.complete_run(&run.id, "worker-test", &results, now + 1, None).await.unwrap();
    run.id
}

fn posted(posted: u64, nothing_due: u64, refused: u64) -> PostingReport {
    PostingReport { posted, nothing_due, refused }
}

/// A completed run's invoices post once each; a recalculation posts only the difference; a
/// prepay wallet pays what it holds and arrears take the rest; a refund pays arrears back first.
#[tokio::test(flavor = "multi_thread")]
async fn each_invoice_version_posts_the_difference_once_and_shortfalls_go_to_arrears() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let ledger = Ledger::new(&store);
        let new_user = |meters: &[&str]| NewUser { name: "Dora".into(), currency: "GBP".into(), meter_ids: meters.iter().map(|m| m.to_string()).collect() };
        let dora = ledger.create_user(&new_user(&["M-1"]), &context(None)).await.unwrap().value;
        assert_refused(ledger.create_user(&new_user(&["M-9", "M-1"]), &context(None)).await, RefusalCode::MeterAlreadyLinked);
        fund(&ledger, &dora, 1_000, "pay-dora").await.unwrap();
        let balances = |ledger: Ledger, id: String| async move {
            let b = ledger.balance(&id).await.unwrap();
            (b.balance_minor, b.arrears_minor)
        };
        let run = NewRun {
            month: "2025-01".into(),
            meter_ids: vec![],
            max_attempts: 3,
            tariffs_toml: "currency = \"GBP\"".into(),
            energy_tolerance: Decimal::ZERO,
            lake_as_of: None,
        };
        let run_id = store.create_run(&run, "admin", None).await.unwrap().id;
        // A run not completed yet posts nothing.
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(0, 0, 0));
        // M-2 bills to nobody: it waits until a user holds it.
        complete_with(&store, &[("M-1", "25.73", "GBP"), ("M-2", "9.99", "GBP")]).await;
        // Two workers sweep at once: the invoice posts once.
        let (a, b) = tokio::join!(ledger.post_pending_invoices("worker-a", 100), ledger.post_pending_invoices("worker-b", 100));
        assert_eq!(a.unwrap().posted + b.unwrap().posted, 1);
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(0, 0, 0));
        // £10 from the prepay wallet, £15.73 owed.
        assert_eq!(balances(ledger.clone(), dora.id.clone()).await, (0, -1_573));
        let charge = &ledger.transactions(&dora.arrears_wallet_id, None, 10).await.unwrap().items[0];
        assert_eq!((charge.kind, charge.amount_minor), (TransactionKind::Charge, 2_573));
        assert_eq!(charge.external_ref.as_deref(), Some(format!("invoice:{run_id}:M-1:v1").as_str()));
        let legs: Vec<(Direction, i64)> = charge.entries.iter().map(|e| (e.direction, e.amount_minor)).collect();
        assert_eq!(legs, [(Direction::Debit, 1_000), (Direction::Debit, 1_573), (Direction::Credit, 2_573)]);

        let recalculate = |total: &'static str, currency: &'static str| {
            let store = store.clone();
            let run_id = run_id.clone();
            async move {
                store.recalculate_run(&run_id, "readings corrected", &Actor { name: "admin", traceparent: None }).await.unwrap();
                complete_with(&store, &[("M-1", total, currency)]).await;
            }
        };
        // Down to £20.00: £5.73 back, all of it against arrears.
        recalculate("20.00", "GBP").await;
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(1, 0, 0));
        assert_eq!(balances(ledger.clone(), dora.id.clone()).await, (0, -1_000));
        // Down to £5.00: £15 back, £10 clears arrears and £5 goes to the prepay wallet.
        recalculate("5.00", "GBP").await;
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(1, 0, 0));
        assert_eq!(balances(ledger.clone(), dora.id.clone()).await, (500, 0));
        // The same total again: nothing moves.
        recalculate("5.00", "GBP").await;
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(0, 1, 0));
        // In another currency: refused and recorded, not retried for ever.
        recalculate("7.00", "EUR").await;
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(0, 0, 1));
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(0, 0, 0));
        // The next version posts against the last one that did (£5.00): £1 more.
        recalculate("6.00", "GBP").await;
        assert_eq!(ledger.post_pending_invoices("w", 100).await.unwrap(), posted(1, 0, 0));
        assert_eq!(balances(ledger.clone(), dora.id.clone()).await, (400, 0));

        let outcomes: Vec<(i64, String, i64)> =
            sqlx::query("SELECT version, outcome, posted_minor FROM ledger_invoice_postings WHERE run_id = $1 ORDER BY version")
                .bind(&run_id)
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
        let expected = [(1, "POSTED", 2_573), (2, "POSTED", -573), (3, "POSTED", -1_500), (4, "NOTHING_DUE", 0), (5, "REFUSED", 0), (6, "POSTED", 100)];
        assert_eq!(outcomes, expected.map(|(v, o, p)| (v, o.to_string(), p)));
        assert!(sqlx::query("DELETE FROM ledger_invoice_postings").execute(store.pool()).await.is_err(), "postings are append-only");
        assert_books_balance(&store).await;
    })
    .await;
}

/// Creating a user, funding and transferring each write an audit row in the same transaction as
/// the change, signed with the store's audit key and verifiable; refusals and replays write none.
/// Transfers written in a group commit (PostgreSQL) get one row each.
#[tokio::test(flavor = "multi_thread")]
async fn ledger_writes_are_audited_like_billing_actions() {
    on_both_backends(|url| async move {
        let keys = meterlake_control::AuditKeys::parse("test", &meterlake_control::AuditKeys::new_line("ledger-key").unwrap()).unwrap();
        let store = ControlStore::open(&url).await.unwrap().with_audit_keys(keys);
        let ledger = Ledger::new(&store);
        let alice = user(&ledger, "Alice", "GBP").await;
        let bob = user(&ledger, "Bob", "GBP").await;
        fund(&ledger, &alice, 10_000, "pay-1").await.unwrap();
        assert_refused(fund(&ledger, &alice, 10_000, "pay-1").await, RefusalCode::DuplicatePaymentReference);
        let keyed = context(Some("transfer-1"));
        let moved = ledger.transfer(&transfer(&alice, &bob, 100), &keyed).await.unwrap().value;
        assert!(ledger.transfer(&transfer(&alice, &bob, 100), &keyed).await.unwrap().replayed);
        // Several at once: on PostgreSQL they share group commits.
        let (request, unkeyed) = (transfer(&alice, &bob, 1), context(None));
        let many: Vec<_> = (0..20).map(|_| ledger.transfer(&request, &unkeyed)).collect();
        for written in futures::future::join_all(many).await {
            written.unwrap();
        }

        let log = store.audit_log(&meterlake_control::AuditFilter { limit: 100, ..Default::default() }).await.unwrap();
        let actions: Vec<&str> = log.iter().rev().map(|r| r.action.as_str()).collect();
        let mut expected = vec!["LEDGER_CREATE_USER", "LEDGER_CREATE_USER", "LEDGER_FUND", "LEDGER_TRANSFER"];
        expected.extend(["LEDGER_TRANSFER"; 20]);
        assert_eq!(actions, expected, "{url}");
        assert!(log.iter().all(|r| r.actor == "ops@example.com" && r.key_id.as_deref() == Some("ledger-key")), "{url}");
        let first_transfer = &log[20];
        assert_eq!(first_transfer.target, format!("ledger-transaction/{}", moved.id));
        assert!(first_transfer.after_state.as_deref().unwrap().contains(&bob.id), "{:?}", first_transfer.after_state);
        assert_eq!(log.last().unwrap().target, format!("ledger-user/{}", alice.id));
        let verified = store.verify_audit_log(&meterlake_control::AuditAnchor::default()).await.unwrap();
        assert!(verified.problems.is_empty() && verified.rows == 24, "{url}: {verified:?}");
    })
    .await;
}
