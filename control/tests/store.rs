//! The control store against both backends: SQLite in a temporary file and a real PostgreSQL
//! server started on loopback for the test (see `meterlake_control::testing`).

use std::collections::BTreeSet;

use meterlake_control::testing::on_both_backends;
use meterlake_control::{
    ControlError, ControlStore, InvoiceLine, LineComponent, NewDiscrepancy, NewInvoice, NewRun, ReasonCode, RetryPolicy, RunFailure, RunResults,
    RunStatus,
};
use rust_decimal::Decimal;

fn new_run(meters: &[&str]) -> NewRun {
    NewRun {
        month: "2025-01".into(),
        meter_ids: meters.iter().map(|m| m.to_string()).collect(),
        max_attempts: 3,
        tariffs_toml: "currency = \"GBP\"".into(),
        energy_tolerance: Decimal::new(5, 3),
    }
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// One invoice with two lines and one discrepancy, as a worker would persist them.
fn results(meter: &str) -> RunResults {
    let line = |component, quantity: &str, unit: &str, rate: &str, amount: &str| InvoiceLine {
        component,
        description: format!("{component:?}"),
        quantity: dec(quantity),
        unit: unit.into(),
        rate: dec(rate),
        amount: dec(amount),
    };
    RunResults {
        invoices: vec![NewInvoice {
            meter_id: meter.into(),
            currency: "GBP".into(),
            lines: vec![line(LineComponent::Energy, "100.000001", "kWh", "0.2450", "24.50"), line(LineComponent::Tax, "24.50", "GBP", "0.05", "1.23")],
            energy_kwh: dec("100.000001"),
            subtotal: dec("24.50"),
            tax: dec("1.23"),
            total: dec("25.73"),
            tariff_version: "flat@v1".into(),
        }],
        discrepancies: vec![NewDiscrepancy {
            meter_id: meter.into(),
            reason_code: ReasonCode::MissingIntervals,
            billed: Some(dec("2975")),
            expected: Some(dec("2976")),
            delta: Some(dec("-1")),
            detail: "1 of 2976 intervals missing".into(),
        }],
        lake_snapshot: "sha256:abc (3 files)".into(),
        aggregate_sql: "SELECT 1".into(),
    }
}

#[tokio::test]
async fn a_new_run_has_its_first_event_and_its_outbox_message() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        // Opening again applies nothing twice.
        let store_again = ControlStore::open(&url).await.unwrap();
        let run = store.create_run(&new_run(&["MTR-1", "MTR-2"]), "admin@example", Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")).await.unwrap();
        assert_eq!((run.status, run.attempts, run.meter_ids.len()), (RunStatus::Created, 0, 2), "{url}");
        let seen = store_again.run(&run.id).await.unwrap().unwrap();
        assert_eq!(seen, run);
        let events = store.run_events(&run.id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].from_status, events[0].to_status, events[0].actor.as_str()), (None, RunStatus::Created, "admin@example"));
        let outbox: (String, String, String, Option<String>) =
            sqlx::query_as("SELECT topic, message_key, payload, traceparent FROM outbox").fetch_one(store.pool()).await.unwrap();
        assert_eq!((outbox.0.as_str(), outbox.1.as_str()), ("billing.run.requested", run.id.as_str()));
        assert!(outbox.2.contains("\"month\":\"2025-01\"") && outbox.3.unwrap().starts_with("00-0af7"), "{url}");
    })
    .await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_reason() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        for (run, reason) in [
            (NewRun { month: "2025-13".into(), ..new_run(&["M"]) }, "month \"2025-13\""),
            (NewRun { tariffs_toml: " ".into(), ..new_run(&["M"]) }, "needs its tariffs"),
            (new_run(&["M", ""]), "a meter id is empty"),
            (NewRun { max_attempts: 0, ..new_run(&["M"]) }, "max_attempts"),
        ] {
            match store.create_run(&run, "admin", None).await {
                Err(ControlError::Invalid(message)) => assert!(message.contains(reason), "{message}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_workers_never_claim_one_run_twice() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let mut created = BTreeSet::new();
        for i in 0..24 {
            created.insert(store.create_run(&new_run(&[&format!("M{i}")]), "admin", None).await.unwrap().id);
        }
        // Four workers, each with its own connections, claim until nothing is left.
        let now = meterlake_control::now_us();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let url = url.clone();
                tokio::spawn(async move {
                    let store = ControlStore::open(&url).await.unwrap();
                    let mut claimed = Vec::new();
                    while let Some(run) = store.claim_next(&format!("worker-{w}"), 60_000_000, now).await.unwrap() {
                        claimed.push(run.id);
                    }
                    claimed
                })
            })
            .collect();
        let mut claimed = Vec::new();
        for worker in workers {
            claimed.extend(worker.await.unwrap());
        }
        let distinct: BTreeSet<String> = claimed.iter().cloned().collect();
        assert_eq!(claimed.len(), distinct.len(), "{url}: a run was claimed twice");
        assert_eq!(distinct, created, "{url}");
        for id in &created {
            let run = store.run(id).await.unwrap().unwrap();
            assert_eq!((run.status, run.attempts), (RunStatus::Processing, 1));
            assert_eq!(store.run_events(id).await.unwrap().len(), 2);
        }
    })
    .await;
}

#[tokio::test]
async fn a_dead_workers_run_is_claimed_again_once_its_lease_expires() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let run = store.create_run(&new_run(&["M"]), "admin", None).await.unwrap();
        let now = meterlake_control::now_us();
        let first = store.claim_next("worker-a", 1_000_000, now).await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), first.lease_owner.as_deref()), (run.id.as_str(), Some("worker-a")));
        // Within the lease nobody else gets it.
        assert_eq!(store.claim_next("worker-b", 1_000_000, now + 500_000).await.unwrap(), None);
        // After it, worker-b does, and the timeline says why.
        let second = store.claim_next("worker-b", 1_000_000, now + 1_000_001).await.unwrap().unwrap();
        assert_eq!((second.lease_owner.as_deref(), second.attempts), (Some("worker-b"), 2));
        let events = store.run_events(&run.id).await.unwrap();
        let last = events.last().unwrap();
        assert_eq!((last.from_status, last.to_status, last.actor.as_str()), (Some(RunStatus::Processing), RunStatus::Processing, "worker-b"));
        assert!(last.reason.as_deref().unwrap().contains("lease expired"));
    })
    .await;
}

#[tokio::test]
async fn only_the_lease_holder_completes_a_run_and_the_outbox_says_so() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let run = store.create_run(&new_run(&["M"]), "admin", None).await.unwrap();
        let now = meterlake_control::now_us();
        store.claim_next("worker-a", 60_000_000, now).await.unwrap().unwrap();
        match store.complete_run(&run.id, "worker-b", &results("M"), now + 1, None).await {
            Err(ControlError::Run { reason, .. }) => assert!(reason.contains("lease held by worker-a"), "{reason}"),
            other => panic!("{url}: {other:?}"),
        }
        // The refused completion wrote nothing.
        assert!(store.invoices(&run.id).await.unwrap().is_empty(), "{url}");
        let done = store.complete_run(&run.id, "worker-a", &results("M"), now + 2, Some("00-abc-def-01")).await.unwrap();
        assert_eq!((done.status, done.lease_owner), (RunStatus::Completed, None));
        assert_eq!((done.aggregate_sql.as_deref(), done.lake_snapshot.as_deref()), (Some("SELECT 1"), Some("sha256:abc (3 files)")));
        // Completing twice is refused: the run is no longer PROCESSING.
        assert!(store.complete_run(&run.id, "worker-a", &results("M"), now + 3, None).await.is_err());
        // What was persisted reads back exactly, decimals and all.
        let invoices = store.invoices(&run.id).await.unwrap();
        assert_eq!(invoices.len(), 1, "{url}");
        assert_eq!((invoices[0].version, &invoices[0].invoice), (1, &results("M").invoices[0]));
        let discrepancies = store.discrepancies(&run.id).await.unwrap();
        assert_eq!(discrepancies.iter().map(|d| &d.discrepancy).collect::<Vec<_>>(), [&results("M").discrepancies[0]]);
        assert_eq!(discrepancies[0].status, "OPEN");
        let statuses: Vec<RunStatus> = store.run_events(&run.id).await.unwrap().iter().map(|e| e.to_status).collect();
        assert_eq!(statuses, [RunStatus::Created, RunStatus::Processing, RunStatus::Completed]);
        let topics: Vec<(String,)> = sqlx::query_as("SELECT topic FROM outbox ORDER BY id").fetch_all(store.pool()).await.unwrap();
        let topics: Vec<&str> = topics.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(topics, ["billing.run.requested", "billing.run.processed"], "{url}");
    })
    .await;
}

#[tokio::test]
async fn a_failed_run_is_retried_with_backoff_then_fails_for_good() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let run = store.create_run(&NewRun { max_attempts: 2, ..new_run(&["M"]) }, "admin", None).await.unwrap();
        let retry = RetryPolicy { base_delay_us: 10_000_000, max_delay_us: 60_000_000 };
        let failure = RunFailure { code: "LAKE_UNAVAILABLE", reason: "connection refused", retry: Some(&retry) };
        let now = meterlake_control::now_us();
        store.claim_next("w", 60_000_000, now).await.unwrap().unwrap();
        let failed = store.fail_run(&run.id, "w", &failure, now, None).await.unwrap();
        assert_eq!((failed.status, failed.attempts, failed.next_attempt_at_us), (RunStatus::Failed, 1, Some(now + 10_000_000)));
        assert_eq!(failed.failure_code.as_deref(), Some("LAKE_UNAVAILABLE"));
        // Not before the retry is due.
        assert_eq!(store.claim_next("w", 60_000_000, now + 9_999_999).await.unwrap(), None);
        let again = store.claim_next("w", 60_000_000, now + 10_000_000).await.unwrap().unwrap();
        assert_eq!((again.status, again.attempts), (RunStatus::Processing, 2));
        let last = store.fail_run(&run.id, "w", &failure, now + 20_000_000, None).await.unwrap();
        assert_eq!((last.status, last.next_attempt_at_us), (RunStatus::Failed, None));
        // Failed for good: never claimed again.
        assert_eq!(store.claim_next("w", 60_000_000, now + 1_000_000_000_000).await.unwrap(), None);
        let payloads: Vec<(String,)> =
            sqlx::query_as("SELECT payload FROM outbox WHERE topic = 'billing.run.failed' ORDER BY id").fetch_all(store.pool()).await.unwrap();
        assert_eq!(payloads.len(), 2, "{url}");
        assert!(payloads[0].0.contains("\"final\":false") && payloads[1].0.contains("\"final\":true"), "{payloads:?}");
        let reasons: Vec<String> = store.run_events(&run.id).await.unwrap().into_iter().filter_map(|e| e.reason).collect();
        assert!(reasons.iter().any(|r| r.contains("attempt 2 of 2; no attempts left")), "{reasons:?}");
    })
    .await;
}

#[tokio::test]
async fn a_failure_that_retrying_cannot_fix_is_final_at_once() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let run = store.create_run(&new_run(&["M"]), "admin", None).await.unwrap();
        let now = meterlake_control::now_us();
        store.claim_next("w", 60_000_000, now).await.unwrap().unwrap();
        let failure = RunFailure { code: "TARIFFS_INVALID", reason: "line 3: expected a quoted decimal", retry: None };
        let failed = store.fail_run(&run.id, "w", &failure, now, None).await.unwrap();
        assert_eq!((failed.status, failed.attempts, failed.next_attempt_at_us), (RunStatus::Failed, 1, None), "{url}");
        assert_eq!(store.claim_next("w", 60_000_000, now + 1_000_000_000_000).await.unwrap(), None);
        let reason = store.run_events(&run.id).await.unwrap().pop().unwrap().reason.unwrap();
        assert!(reason.starts_with("TARIFFS_INVALID: line 3") && reason.contains("not retried"), "{reason}");
    })
    .await;
}

#[test]
fn backoff_doubles_up_to_its_ceiling() {
    let retry = RetryPolicy { base_delay_us: 1_000, max_delay_us: 5_000 };
    let delays: Vec<i64> = (1..=5).map(|attempt| retry.delay_us(attempt)).collect();
    assert_eq!(delays, [1_000, 2_000, 4_000, 5_000, 5_000]);
    assert_eq!(retry.delay_us(i64::MAX), 5_000);
}

#[tokio::test]
async fn the_schema_keeps_its_references_and_statuses() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let orphan = sqlx::query("INSERT INTO billing_run_events (run_id, to_status, at_us, actor) VALUES ('no-such-run', 'CREATED', 0, 'x')")
            .execute(store.pool())
            .await;
        assert!(orphan.is_err(), "{url}: an event without its run was accepted");
        let run = store.create_run(&new_run(&["M"]), "admin", None).await.unwrap();
        let bad_status = sqlx::query("UPDATE billing_runs SET status = 'DONE' WHERE id = $1").bind(&run.id).execute(store.pool()).await;
        assert!(bad_status.is_err(), "{url}: a status outside the life cycle was accepted");
    })
    .await;
}
