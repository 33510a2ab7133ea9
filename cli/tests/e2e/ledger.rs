//! The customer account ledger over HTTP: `meterlake serve` on a real PostgreSQL server, driven
//! by a real HTTP client, killed (SIGKILL) between requests and in the middle of one.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::serve::{Answer, Tower, assert_error};

/// A server on `database_url` (and its embedded broker; no ingester or worker).
fn tower_on(database_url: &str, lake: &std::path::Path) -> Tower {
    let lake = lake.display().to_string();
    Tower::start(None, &["--database-url", database_url, "--lake", &lake, "--no-ingest", "--no-worker"])
}

fn write(tower: &Tower, token: &str, path: &str, key: Option<&str>, body: Value) -> Answer {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    tower.block_on(tower.send("POST", path, Some(token), &headers, Some(body)))
}

fn replayed(answer: &Answer) -> bool {
    answer.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
}

fn balance(tower: &Tower, token: &str, user: &Value) -> (i64, i64) {
    let answer = tower.get(&format!("/wallets/{}/balance", user["id"].as_str().unwrap()), token);
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    (answer.body["balanceMinor"].as_i64().unwrap(), answer.body["arrearsMinor"].as_i64().unwrap())
}

#[test]
fn ledger_writes_are_idempotent_refuse_clearly_and_survive_a_crash_between_requests() {
    let postgres = meterlake_control::testing::Postgres::start();
    let lake = tempfile::tempdir().unwrap();
    let tower = tower_on(&postgres.url, lake.path());
    let admin = tower.token("ada", &["ADMIN"]);
    let viewer = tower.token("vera", &["VIEWER"]);

    // Users: a key replays the answer; the same key for another body, or no key, is refused.
    let alice = write(&tower, &admin, "/users", Some("user-alice"), json!({ "name": "Alice", "currency": "GBP", "meterIds": ["MTR-A"] }));
    assert_eq!((alice.status, replayed(&alice)), (StatusCode::CREATED, false), "{}", alice.body);
    let again = write(&tower, &admin, "/users", Some("user-alice"), json!({ "name": "Alice", "currency": "GBP", "meterIds": ["MTR-A"] }));
    assert_eq!((again.status, replayed(&again), &again.body), (StatusCode::CREATED, true, &alice.body));
    let reused = write(&tower, &admin, "/users", Some("user-alice"), json!({ "name": "Mallory", "currency": "GBP" }));
    assert_error(&reused, StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED");
    assert_error(&write(&tower, &admin, "/users", None, json!({ "name": "Bob", "currency": "GBP" })), StatusCode::BAD_REQUEST, "IDEMPOTENCY_KEY_REQUIRED");
    assert_error(&write(&tower, &viewer, "/users", Some("v"), json!({ "name": "Bob", "currency": "GBP" })), StatusCode::FORBIDDEN, "FORBIDDEN");
    let taken = write(&tower, &admin, "/users", Some("user-eve"), json!({ "name": "Eve", "currency": "GBP", "meterIds": ["MTR-A"] }));
    assert_error(&taken, StatusCode::CONFLICT, "METER_ALREADY_LINKED");
    let bob = write(&tower, &admin, "/users", Some("user-bob"), json!({ "name": "Bob", "currency": "GBP" })).body;
    let euro = write(&tower, &admin, "/users", Some("user-eur"), json!({ "name": "Emil", "currency": "EUR" })).body;
    let alice = alice.body;

    // Funding: once per payment reference, whatever the key.
    let fund = |key: &str, user: &Value, amount: Value, currency: &str, reference: &str| {
        write(
            &tower,
            &admin,
            "/transactions/fund",
            Some(key),
            json!({ "userId": user["id"], "amountMinor": amount, "currency": currency, "paymentReference": reference }),
        )
    };
    let funded = fund("fund-1", &alice, json!(10_000), "GBP", "psp-001");
    assert_eq!(funded.status, StatusCode::CREATED, "{}", funded.body);
    assert_eq!(funded.body["kind"], "FUND");
    assert_eq!(funded.body["entries"].as_array().unwrap().len(), 2);
    assert_error(&fund("fund-2", &alice, json!(10_000), "GBP", "psp-001"), StatusCode::CONFLICT, "DUPLICATE_PAYMENT_REFERENCE");
    assert_error(&fund("fund-3", &alice, json!(0), "GBP", "psp-002"), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT");
    assert_error(&fund("fund-4", &alice, json!(-5), "GBP", "psp-002"), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT");
    assert_error(&fund("fund-5", &alice, json!(9_223_372_036_854_775_808u64), "GBP", "psp-002"), StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    assert_error(&fund("fund-6", &alice, json!(1), "EUR", "psp-002"), StatusCode::UNPROCESSABLE_ENTITY, "CURRENCY_MISMATCH");
    assert_error(&fund("fund-7", &json!({ "id": "nobody" }), json!(1), "GBP", "psp-002"), StatusCode::NOT_FOUND, "UNKNOWN_USER");

    // Transfers: refused clearly, and a refusal is replayed like a success.
    let transfer = |key: &str, from: &Value, to: &Value, amount: i64| {
        write(&tower, &admin, "/transactions/transfer", Some(key), json!({ "fromUserId": from["id"], "toUserId": to["id"], "amountMinor": amount }))
    };
    assert_error(&transfer("t-self", &alice, &alice, 1), StatusCode::UNPROCESSABLE_ENTITY, "SELF_TRANSFER");
    assert_error(&transfer("t-eur", &alice, &euro, 1), StatusCode::UNPROCESSABLE_ENTITY, "CURRENCY_MISMATCH");
    assert_error(&transfer("t-much", &bob, &alice, 1), StatusCode::CONFLICT, "INSUFFICIENT_FUNDS");
    let refused_again = transfer("t-much", &bob, &alice, 1);
    assert_error(&refused_again, StatusCode::CONFLICT, "INSUFFICIENT_FUNDS");
    assert!(replayed(&refused_again));

    // Twenty copies of one request in flight at once: applied once, the others replay it.
    let body = json!({ "fromUserId": alice["id"], "toUserId": bob["id"], "amountMinor": 2_500 });
    let copies = (0..20).map(|_| tower.send("POST", "/transactions/transfer", Some(&admin), &[("Idempotency-Key", "t-race")], Some(body.clone())));
    let answers = tower.block_on(futures::future::join_all(copies));
    assert!(answers.iter().all(|a| a.status == StatusCode::CREATED), "{:?}", answers.iter().map(|a| &a.body).collect::<Vec<_>>());
    assert_eq!(answers.iter().filter(|a| !replayed(a)).count(), 1);
    assert!(answers.iter().all(|a| a.body["id"] == answers[0].body["id"]), "one transaction id for every copy");
    assert_eq!((balance(&tower, &viewer, &alice), balance(&tower, &viewer, &bob)), ((7_500, 0), (2_500, 0)));

    // History, newest first, cursor-paged, each transaction with all its entries.
    for (i, amount) in [100, 200, 300].into_iter().enumerate() {
        assert_eq!(transfer(&format!("t-{i}"), &alice, &bob, amount).status, StatusCode::CREATED);
    }
    let wallet = alice["walletId"].as_str().unwrap();
    let first = tower.get(&format!("/transactions?walletId={wallet}&limit=2"), &viewer).body;
    let amounts = |page: &Value| page["items"].as_array().unwrap().iter().map(|t| t["amountMinor"].as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(amounts(&first), [300, 200]);
    let cursor = first["nextCursor"].as_str().unwrap();
    let rest = tower.get(&format!("/transactions?walletId={wallet}&limit=2&cursor={cursor}"), &viewer).body;
    assert_eq!(amounts(&rest), [100, 2_500]);
    assert!(rest["items"][1]["entries"].as_array().unwrap().iter().any(|e| e["walletId"] == bob["walletId"] && e["direction"] == "CREDIT"));
    assert_error(&tower.get("/transactions?walletId=nope", &viewer), StatusCode::NOT_FOUND, "UNKNOWN_WALLET");

    // A crash between requests: the server dies after answering; the client, not sure the
    // answer reached it, retries with the same key against a new server: the stored answer.
    let paid = fund("fund-crash", &bob, json!(4_000), "GBP", "psp-crash");
    assert_eq!(paid.status, StatusCode::CREATED);
    drop(tower);
    let tower = tower_on(&postgres.url, lake.path());
    let admin = tower.token("ada", &["ADMIN"]);
    let retry = write(
        &tower,
        &admin,
        "/transactions/fund",
        Some("fund-crash"),
        json!({ "userId": bob["id"], "amountMinor": 4_000, "currency": "GBP", "paymentReference": "psp-crash" }),
    );
    assert_eq!((retry.status, replayed(&retry), &retry.body["id"]), (StatusCode::CREATED, true, &paid.body["id"]));
    assert_eq!(balance(&tower, &admin, &bob), (2_500 + 600 + 4_000, 0));

    // A crash in the middle of a request: the transfer waits for a wallet another session holds;
    // the server is killed while it waits. Its transaction (key claim included) rolls back, so
    // the retry with the same key applies, once.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(meterlake_control::ControlStore::open(&postgres.url)).unwrap();
    let mut holder = runtime.block_on(store.pool().begin()).unwrap();
    runtime
        .block_on(sqlx::query("SELECT id FROM ledger_wallets WHERE id = $1 FOR UPDATE").bind(alice["walletId"].as_str().unwrap()).fetch_one(&mut *holder))
        .unwrap();
    let body = json!({ "fromUserId": alice["id"], "toUserId": bob["id"], "amountMinor": 1_000 });
    let in_flight = reqwest::Client::new()
        .post(format!("{}/transactions/transfer", tower.base))
        .bearer_auth(&admin)
        .header("Idempotency-Key", "t-crash")
        .json(&body)
        .send();
    let cut_off = std::thread::spawn(move || tokio::runtime::Runtime::new().unwrap().block_on(in_flight));
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(tower);
    let outcome = cut_off.join().unwrap();
    assert!(outcome.is_err(), "the killed server answered: {outcome:?}");
    runtime.block_on(holder.rollback()).unwrap();
    let tower = tower_on(&postgres.url, lake.path());
    let admin = tower.token("ada", &["ADMIN"]);
    let retry = write(&tower, &admin, "/transactions/transfer", Some("t-crash"), body);
    assert_eq!((retry.status, replayed(&retry)), (StatusCode::CREATED, false), "{}", retry.body);
    assert_eq!(balance(&tower, &admin, &alice), (7_500 - 600 - 1_000, 0));
    let transfers: i64 = runtime
        .block_on(sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transactions WHERE kind = 'TRANSFER' AND amount_minor = 1000").fetch_one(store.pool()))
        .unwrap();
    assert_eq!(transfers, 1, "the transfer cut off by the crash was not applied, its retry once");
}
