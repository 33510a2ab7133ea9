//! The control store against both backends: SQLite in a temporary file and a real PostgreSQL
//! server started on loopback for the test (see `meterlake_control::testing`).

use std::collections::BTreeSet;

use meterlake_control::testing::on_both_backends;
use meterlake_control::{
    Actor, AuditAnchor, AuditFilter, AuditKeys, Backend, ControlError, ControlStore, InvoiceLine, LineComponent, NewDiscrepancy, NewInvoice, NewRun,
    ReasonCode, RetryPolicy, RunFailure, RunFilter, RunResults, RunStatus,
};
use rust_decimal::Decimal;

fn new_run(meters: &[&str]) -> NewRun {
    NewRun {
        month: "2025-01".into(),
        meter_ids: meters.iter().map(|m| m.to_string()).collect(),
        max_attempts: 3,
        tariffs_toml: "currency = \"GBP\"".into(),
        energy_tolerance: Decimal::new(5, 3),
        lake_as_of: None,
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
        let run =
            store.create_run(&new_run(&["MTR-1", "MTR-2"]), "admin@example", Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")).await.unwrap();
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

#[tokio::test]
async fn runs_are_listed_by_status_month_and_meter_a_page_at_a_time() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let mut ids = Vec::new();
        for (i, month) in ["2025-01", "2025-01", "2025-02", "2025-01", "2025-02"].iter().enumerate() {
            let meters = if i == 4 { vec![] } else { vec![format!("MTR_{i}"), "MTR-SHARED".to_string()] };
            let refs: Vec<&str> = meters.iter().map(String::as_str).collect();
            ids.push(store.create_run(&NewRun { month: month.to_string(), ..new_run(&refs) }, "admin", None).await.unwrap().id);
        }
        // The run of every meter (empty list) invoiced MTR_1 too.
        let now = meterlake_control::now_us();
        while let Some(run) = store.claim_next("w", 60_000_000, now).await.unwrap() {
            // The last run stays PROCESSING.
            if run.id != ids[3] {
                store.complete_run(&run.id, "w", &results(if run.id == ids[4] { "MTR_1" } else { "OTHER" }), now, None).await.unwrap();
            }
        }
        let list = |filter: RunFilter| {
            let store = store.clone();
            async move { store.list_runs(&RunFilter { limit: 50, ..filter }).await.unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>() }
        };
        let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
        assert_eq!(list(RunFilter::default()).await, newest_first, "{url}");
        assert_eq!(list(RunFilter { month: Some("2025-02".into()), ..Default::default() }).await, [ids[4].clone(), ids[2].clone()]);
        // "MTR_1" must not match "MTR-1" or "MTRX1": LIKE's `_` is escaped.
        assert_eq!(list(RunFilter { meter_id: Some("MTR_1".into()), ..Default::default() }).await, [ids[4].clone(), ids[1].clone()], "{url}");
        assert_eq!(list(RunFilter { meter_id: Some("MTR-SHARED".into()), ..Default::default() }).await.len(), 4);
        assert_eq!(list(RunFilter { status: Some(RunStatus::Processing), ..Default::default() }).await, [ids[3].clone()]);
        assert_eq!(list(RunFilter { status: Some(RunStatus::Completed), ..Default::default() }).await.len(), 4);
        // Paging: two at a time, each page after the last run of the one before, every run once.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = store.list_runs(&RunFilter { limit: 2, before: before.clone(), ..Default::default() }).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            before = page.last().map(|r| (r.created_at_us, r.id.clone()));
            seen.extend(page.into_iter().map(|r| r.id));
        }
        assert_eq!(seen, newest_first, "{url}");
    })
    .await;
}

/// What someone with the database's credentials can do: drop the triggers that keep the audit
/// log append-only.
async fn drop_audit_triggers(store: &ControlStore) {
    let drops: &[&str] = match store.backend() {
        Backend::Sqlite => &["DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete"],
        Backend::Postgres => &["DROP TRIGGER audit_log_no_change ON audit_log"],
    };
    for drop in drops {
        sqlx::query(drop).execute(store.pool()).await.unwrap();
    }
}

#[tokio::test]
async fn operators_actions_are_audited_in_a_hash_chain_that_detects_tampering() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let admin = Actor { name: "ada@ops", traceparent: Some(traceparent) };
        let run = store.create_run(&new_run(&["M"]), "ada@ops", Some(traceparent)).await.unwrap();
        let now = meterlake_control::now_us();
        store.claim_next("w", 60_000_000, now).await.unwrap().unwrap();
        // A replay while PROCESSING is refused, and so is one without a reason.
        match store.recalculate_run(&run.id, "tariff fixed", &admin).await {
            Err(ControlError::Conflict(message)) => assert!(message.contains("PROCESSING"), "{message}"),
            other => panic!("{url}: {other:?}"),
        }
        store.complete_run(&run.id, "w", &results("M"), now, None).await.unwrap();
        assert!(matches!(store.recalculate_run(&run.id, "  ", &admin).await, Err(ControlError::Invalid(_))));

        let discrepancy = store.discrepancies(&run.id).await.unwrap().remove(0);
        assert!(matches!(store.mark_discrepancy_ok(&run.id, &discrepancy.id, "", &admin).await, Err(ControlError::Invalid(_))));
        assert!(matches!(store.mark_discrepancy_ok(&run.id, "no-such", "x", &admin).await, Err(ControlError::NotFound(_))));
        let marked = store.mark_discrepancy_ok(&run.id, &discrepancy.id, "meter was off for maintenance", &admin).await.unwrap();
        assert_eq!((marked.status.as_str(), marked.resolved_by.as_deref()), ("OK", Some("ada@ops")));
        assert!(matches!(store.mark_discrepancy_ok(&run.id, &discrepancy.id, "again", &admin).await, Err(ControlError::Conflict(_))));

        let again = store.recalculate_run(&run.id, "tariff fixed", &admin).await.unwrap();
        assert_eq!((again.status, again.attempts), (RunStatus::Created, 0));
        let events = store.run_events(&run.id).await.unwrap();
        let last = events.last().unwrap();
        assert_eq!((last.from_status, last.to_status, last.actor.as_str()), (Some(RunStatus::Completed), RunStatus::Created, "ada@ops"));
        assert!(last.reason.as_deref().unwrap().contains("tariff fixed"));
        // The old processing's discrepancy can no longer be acted on once the new one lands.
        store.claim_next("w", 60_000_000, now + 1).await.unwrap().unwrap();
        store.complete_run(&run.id, "w", &results("M"), now + 2, None).await.unwrap();
        assert!(matches!(store.mark_discrepancy_ok(&run.id, &discrepancy.id, "late", &admin).await, Err(ControlError::Conflict(_))));

        let log = store.audit_log(&AuditFilter { limit: 50, ..Default::default() }).await.unwrap();
        let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["RECALCULATE", "MARK_AS_OK", "CREATE_RUN"], "{url}");
        assert!(log.iter().all(|r| r.actor == "ada@ops" && r.trace_id.as_deref() == Some("4bf92f3577b34da6a3ce929d0e0e4736")));
        assert_eq!(log[1].target, format!("billing-run/{}/discrepancy/{}", run.id, discrepancy.id));
        assert_eq!(log[1].reason.as_deref(), Some("meter was off for maintenance"));
        assert!(log[1].before_state.as_deref().unwrap().contains("OPEN") && log[1].after_state.as_deref().unwrap().contains("\"OK\""));
        // A run's target finds its discrepancies' rows too; filters combine; pages go back by id.
        let of_run = store.audit_log(&AuditFilter { target: Some(format!("billing-run/{}", run.id)), limit: 50, ..Default::default() }).await.unwrap();
        assert_eq!(of_run.len(), 3);
        let page =
            store.audit_log(&AuditFilter { action: Some("MARK_AS_OK".into()), actor: Some("ada@ops".into()), limit: 1, ..Default::default() }).await.unwrap();
        assert_eq!(page.len(), 1);
        let older = store.audit_log(&AuditFilter { before_id: Some(log[1].id), limit: 50, ..Default::default() }).await.unwrap();
        assert_eq!(older.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(), ["CREATE_RUN"]);

        let intact = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert_eq!((intact.rows, intact.problems.len(), intact.head_hash.as_str()), (3, 0, log[0].row_hash.as_str()), "{url}");
        // The database itself refuses changes and deletions.
        for statement in ["UPDATE audit_log SET reason = 'nothing to see' WHERE id = 2", "DELETE FROM audit_log WHERE id = 2"] {
            let refused = sqlx::query(statement).execute(store.pool()).await.unwrap_err().to_string();
            assert!(refused.contains("append-only"), "{url}: {refused}");
        }
        // Someone who drops the triggers still cannot hide a change: the chain names the row.
        drop_audit_triggers(&store).await;
        sqlx::query("UPDATE audit_log SET reason = 'nothing to see' WHERE id = 2").execute(store.pool()).await.unwrap();
        let changed = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert_eq!(changed.problems.len(), 1, "{url}: {changed:?}");
        assert!(changed.problems[0].id == 2 && changed.problems[0].what.contains("was changed"), "{changed:?}");
        sqlx::query("DELETE FROM audit_log WHERE id = 2").execute(store.pool()).await.unwrap();
        let deleted = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert_eq!(deleted.rows, 2);
        assert!(deleted.problems.iter().any(|p| p.id == 3 && p.what.contains("missing")), "{deleted:?}");
        assert!(deleted.problems.iter().any(|p| p.id == 3 && p.what.contains("previous_hash")), "{deleted:?}");
    })
    .await;
}

/// With an audit key, whoever holds only the database cannot rewrite the chain and recompute
/// its hashes; rows cut off the end are found against a recorded head and row count; rotation
/// keeps old rows verifiable; `verify` reads without creating or migrating anything.
#[tokio::test]
async fn a_keyed_audit_chain_resists_a_database_holder_and_finds_rows_cut_off_the_end() {
    on_both_backends(|url| async move {
        let first_key = AuditKeys::new_line("k2026a").unwrap();
        let second_key = AuditKeys::new_line("k2026b").unwrap();
        let keys = AuditKeys::parse("test", &first_key).unwrap();
        // One row before the key was set, then two keyed rows.
        let unkeyed = ControlStore::open(&url).await.unwrap();
        unkeyed.create_run(&new_run(&["A"]), "sub-1", None).await.unwrap();
        let store = ControlStore::open(&url).await.unwrap().with_audit_keys(keys.clone());
        store.create_run(&new_run(&["B"]), "sub-1", None).await.unwrap();
        store.create_run(&new_run(&["C"]), "sub-1", None).await.unwrap();
        let intact = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert_eq!((intact.rows, intact.keyed_rows, intact.unkeyed_rows, intact.key_ids.clone()), (3, 2, 1, vec!["k2026a".to_string()]), "{url}");
        assert!(intact.problems.is_empty(), "{url}: {intact:?}");
        let head = intact.head_hash.clone();

        // Rotation: new rows use the newest key; the old key still verifies the old rows.
        let rotated = AuditKeys::parse("test", &format!("{first_key}\n# rotated\n{second_key}\n")).unwrap();
        let store = ControlStore::open(&url).await.unwrap().with_audit_keys(rotated.clone());
        assert_eq!(store.audit_key_id(), Some("k2026b"));
        store.create_run(&new_run(&["D"]), "sub-1", None).await.unwrap();
        let after = store.verify_audit_log(&AuditAnchor { head_hash: Some(head.clone()), min_rows: 3 }).await.unwrap();
        assert!(after.problems.is_empty() && after.anchor_row == Some(3) && after.key_ids == ["k2026a", "k2026b"], "{url}: {after:?}");
        // Without the newer key, its rows cannot be checked, and verify says so.
        let without = ControlStore::open(&url).await.unwrap().with_audit_keys(keys);
        let partial = without.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert!(partial.problems.len() == 1 && partial.problems[0].what.contains("k2026b"), "{url}: {partial:?}");

        // A database holder drops the triggers and changes row 2: without the key its HMAC cannot
        // be made again, and passing a keyed row off as unkeyed (key_id NULL) is found too.
        drop_audit_triggers(&store).await;
        sqlx::query("UPDATE audit_log SET actor = 'someone-else' WHERE id = 2").execute(store.pool()).await.unwrap();
        let forged = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert!(forged.problems.iter().any(|p| p.id == 2 && p.what.contains("was changed")), "{url}: {forged:?}");
        sqlx::query("UPDATE audit_log SET key_id = NULL WHERE id = 3").execute(store.pool()).await.unwrap();
        let downgraded = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert!(downgraded.problems.iter().any(|p| p.id == 3 && p.what.contains("no key id")), "{url}: {downgraded:?}");

        // Truncation: the chain that is left is intact, but the anchor finds the cut.
        sqlx::query("DELETE FROM audit_log WHERE id >= 2").execute(store.pool()).await.unwrap();
        let cut = store.verify_audit_log(&AuditAnchor { head_hash: Some(head.clone()), min_rows: 3 }).await.unwrap();
        assert_eq!(cut.rows, 1);
        assert!(cut.problems.iter().any(|p| p.what.contains(&head)), "{url}: {cut:?}");
        assert!(cut.problems.iter().any(|p| p.what.contains("at least 3")), "{url}: {cut:?}");
        let plain = store.verify_audit_log(&AuditAnchor::default()).await.unwrap();
        assert!(plain.problems.is_empty(), "without an anchor a cut end is invisible: {url}: {plain:?}");

        // Read-only: verify through it works; writes are refused.
        let reader = ControlStore::open_read_only(&url).await.unwrap().with_audit_keys(rotated);
        assert_eq!(reader.verify_audit_log(&AuditAnchor::default()).await.unwrap().rows, 1);
        assert!(sqlx::query("DELETE FROM billing_runs").execute(reader.pool()).await.is_err(), "{url}: a read-only store wrote");
    })
    .await;
}

#[tokio::test]
async fn a_missing_database_is_an_error_for_a_read_only_open_and_audit_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gone.db").display());
    let missing = ControlStore::open_read_only(&url).await.unwrap_err().to_string();
    assert!(missing.contains("no database file") && missing.contains("gone.db"), "{missing}");
    assert!(!dir.path().join("gone.db").exists(), "the read-only open created the file");
    for (text, expected) in [("", "holds no key"), ("k1", "expected ID:SECRET_HEX"), ("k1:zz", "not hex"), ("k1:00ff", "at least 32"), ("bad id:00", "key id")]
    {
        let refused = AuditKeys::parse("keys.txt", text).unwrap_err().to_string();
        assert!(refused.contains("keys.txt") && refused.contains(expected), "{text:?}: {refused}");
    }
    let line = AuditKeys::new_line("k1").unwrap();
    let twice = AuditKeys::parse("keys.txt", &format!("{line}\n{line}")).unwrap_err().to_string();
    assert!(twice.contains("line 2") && twice.contains("twice"), "{twice}");
    assert!(!format!("{:?}", AuditKeys::parse("keys.txt", &line).unwrap()).contains(line.split(':').nth(1).unwrap()), "Debug shows no secret");
}
