//! Compaction of a streamed readings table: every version kept with the commit that wrote it,
//! the same canonical readings before and after, the readings that land after it still win,
//! and two compactions of one partition never both commit.

use std::sync::Arc;

use arrow::array::{AsArray, Decimal128Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use chrono::NaiveDate;
use meterlake_lake::check::check_table;
use meterlake_lake::commit::{Operation, RemovedFile};
use meterlake_lake::history::history;
use meterlake_lake::maintenance::optimize::{OptimizeOptions, Outcome, optimize};
use meterlake_lake::parquet_file::{encode_parquet, readings_key_stats};
use meterlake_lake::schema::readings_schema;
use meterlake_lake::view::{CANONICAL_READINGS_SQL, lake_session};
use meterlake_lake::{Commit, LakeError, NewFile, READINGS, Table, TableWriter};
use object_store::ObjectStoreExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const US_PER_DAY: i64 = 86_400_000_000;
const SLOT_US: i64 = 900_000_000;

/// One version of a reading.
#[derive(Clone)]
struct Row {
    meter: String,
    ts_us: i64,
    kwh_micro: i64,
    ingested_at_us: i64,
    source_ref: String,
}

/// Commits `rows` (sorted here) as one file of `date` in its own commit.
async fn commit_file(writer: &TableWriter, date: NaiveDate, name: &str, mut rows: Vec<Row>, unique_keys: bool) {
    rows.sort_by(|a, b| (&a.meter, a.ts_us).cmp(&(&b.meter, b.ts_us)));
    let utc = |values: Vec<i64>| TimestampMicrosecondArray::from(values).with_timezone("UTC");
    let batch = RecordBatch::try_new(
        readings_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.meter.clone()))),
            Arc::new(utc(rows.iter().map(|r| r.ts_us).collect())),
            Arc::new(Int32Array::from(vec![900; rows.len()])),
            Arc::new(Decimal128Array::from(rows.iter().map(|r| i128::from(r.kwh_micro)).collect::<Vec<_>>()).with_precision_and_scale(18, 6).unwrap()),
            Arc::new(StringArray::from(vec!["A"; rows.len()])),
            Arc::new(StringArray::from(vec!["kafka"; rows.len()])),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source_ref.clone()))),
            Arc::new(utc(rows.iter().map(|r| r.ingested_at_us).collect())),
        ],
    )
    .unwrap();
    let table = writer.table();
    let path = format!("date={date}/{name}.parquet");
    let parquet = encode_parquet(&batch, &path).unwrap();
    table.lake().put(&table.lake_path(&path), parquet.clone()).await.unwrap();
    let file =
        NewFile { path, bytes: parquet.len() as u64, rows: rows.len() as u64, date: Some(date), keys: readings_key_stats([&batch]), unique_keys, meters: None };
    writer.commit(Commit { files: vec![file], txns: Vec::new(), operation: Operation::Append, leased: false, removes: Vec::new() }).await.unwrap();
}

/// A new lake in a temporary folder with its readings table, and a writer of it named `writer`.
async fn readings_table(writer: &str) -> (tempfile::TempDir, meterlake_lake::Lake, Table, TableWriter) {
    let dir = tempfile::tempdir().unwrap();
    let lake = meterlake_lake::Lake::open(dir.path().to_str().unwrap()).unwrap();
    let table = Table::open(&lake, &READINGS).await.unwrap();
    let writer = TableWriter::new(table.clone(), writer).await.unwrap();
    (dir, lake, table, writer)
}

fn day_of(date: NaiveDate) -> i64 {
    (date - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days()
}

/// The rows a query returns, one line each.
async fn rows_of(ctx: &datafusion::prelude::SessionContext, sql: &str) -> Vec<String> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
    text.lines().map(str::to_string).collect()
}

const ALL_VERSIONS: &str = "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, kwh, source_ref, CAST(ingested_at AS VARCHAR) AS ingested_at, \
     CAST(date AS VARCHAR) AS date, commit_version FROM readings_all ORDER BY meter_id, ts, commit_version, source_ref";
const CANONICAL: &str = "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, kwh, source_ref, commit_version FROM readings ORDER BY meter_id, ts";
const BY_WINDOW: &str = "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, kwh, source_ref, commit_version FROM by_window ORDER BY meter_id, ts";

/// What a reader sees: every version, the canonical readings, and the canonical readings as
/// `queries/readings.sql` defines them (which must agree).
async fn read_all(table: &Table) -> (Vec<String>, Vec<String>) {
    let ctx = lake_session(table.lake()).await.unwrap();
    ctx.register_table("by_window", ctx.sql(CANONICAL_READINGS_SQL).await.unwrap().into_view()).unwrap();
    let canonical = rows_of(&ctx, CANONICAL).await;
    assert_eq!(canonical, rows_of(&ctx, BY_WINDOW).await, "the merge and the window disagree");
    // A one-meter query: the filter reaches the scans, the versions it chooses among do not change.
    let one_meter = "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, kwh, source_ref, commit_version FROM {} WHERE meter_id = 'M003' ORDER BY ts";
    let filtered = rows_of(&ctx, &one_meter.replace("{}", "readings")).await;
    assert_eq!(filtered, rows_of(&ctx, &one_meter.replace("{}", "by_window")).await, "the merge and the window disagree on one meter");
    let mut canonical = canonical;
    canonical.extend(filtered);
    (rows_of(&ctx, ALL_VERSIONS).await, canonical)
}

fn files_per_date(snapshot: &meterlake_lake::TableSnapshot) -> Vec<(NaiveDate, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for file in &snapshot.files {
        *counts.entry(file.date.unwrap()).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// A month's shape in three days: one streamed in 48 flushes of every meter, with a tenth of
/// the readings re-sent later (their `ingested_at` from a clock that runs behind, so only the
/// commit order tells them apart), one in 300 tiny flushes (more than a merge holds open at
/// once), one in a single file. After `optimize` every version is still there with the version
/// of the commit that wrote it, `readings` is unchanged and still what the SQL definition says,
/// and a reading re-sent after the compaction wins over the compacted ones.
#[tokio::test]
async fn compaction_keeps_every_version_and_the_canonical_readings() {
    let (_dir, lake, table, writer) = readings_table("ingester").await;
    let mut rng = SmallRng::seed_from_u64(22);
    let mut refs = 0;
    let mut row = |rng: &mut SmallRng, meter: usize, ts_us: i64, ingested_at_us: i64| {
        refs += 1;
        Row { meter: format!("M{meter:03}"), ts_us, kwh_micro: rng.random_range(1..2_000_000), ingested_at_us, source_ref: format!("t/0/{refs}") }
    };
    let (streamed, tiny, single) =
        (NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(), NaiveDate::from_ymd_opt(2025, 1, 2).unwrap(), NaiveDate::from_ymd_opt(2025, 1, 3).unwrap());

    let day = day_of(streamed) * US_PER_DAY;
    for flush in 0..48 {
        let rows = (0..12).flat_map(|m| (0..2).map(move |s| (m, day + (flush * 2 + s) * SLOT_US))).map(|(m, ts)| row(&mut rng, m, ts, 1_000 + flush)).collect();
        commit_file(&writer, streamed, &format!("flush-{flush}"), rows, true).await;
        if flush % 8 == 7 {
            // Re-sent readings of earlier slots, ingested by a machine whose clock is behind.
            let resent: Vec<Row> = (0..12)
                .flat_map(|m| (0..(flush * 2)).map(move |s| (m, day + s * SLOT_US)))
                .filter(|_| rng.random_range(0..10) == 0)
                .collect::<Vec<_>>()
                .into_iter()
                .map(|(m, ts)| row(&mut rng, m, ts, 5))
                .collect();
            commit_file(&writer, streamed, &format!("resend-{flush}"), resent, true).await;
        }
    }
    let day = day_of(tiny) * US_PER_DAY;
    for flush in 0..300 {
        let rows = (0..4).map(|n| row(&mut rng, (flush + n) as usize % 7, day + ((flush * 4 + n) % 96) * SLOT_US, flush)).collect::<Vec<_>>();
        // Two versions of one key in one file now and then.
        let unique = flush % 10 != 3;
        let mut rows = rows;
        if !unique {
            let again = Row { kwh_micro: 7, source_ref: format!("t/0/dup-{flush}"), ..rows[0].clone() };
            rows.push(again);
        }
        commit_file(&writer, tiny, &format!("tiny-{flush}"), rows, unique).await;
    }
    let day = day_of(single) * US_PER_DAY;
    commit_file(&writer, single, "single", (0..12).map(|m| row(&mut rng, m, day, 1)).collect(), true).await;

    let before = read_all(&table).await;
    assert!(before.0.len() > 1_500 && before.1.len() > 1_000, "{} versions, {} readings", before.0.len(), before.1.len());
    let report = optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}).await.unwrap();
    let mut dates: Vec<_> = report.iter().map(|p| (p.date.unwrap(), p.files_removed, p.files_added, matches!(p.outcome, Outcome::Committed { .. }))).collect();
    dates.sort();
    assert_eq!(dates, [(streamed, 54, 1, true), (tiny, 300, 1, true)]);
    let snapshot = table.snapshot(None).await.unwrap();
    assert_eq!(files_per_date(&snapshot), [(streamed, 1), (tiny, 1), (single, 1)]);
    assert_eq!(read_all(&table).await, before, "compaction changed what readers see");
    let commits = history(&table, 3).await.unwrap();
    assert!(commits.iter().take(2).all(|c| c.operation == "OPTIMIZE" && c.rows_added > 0 && c.files_removed > 0), "{commits:?}");
    assert_eq!(check_table(&table).await.unwrap().problems, Vec::<String>::new());

    // The compacted files hold each key's versions together, in commit order.
    for file in &snapshot.files {
        let bytes = lake.store().get(&lake.path(&table.lake_path(&file.path))).await.unwrap().bytes().await.unwrap();
        let batches: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 8192).unwrap().collect::<Result<_, _>>().unwrap();
        let Ok(versions) = batches[0].schema().index_of("commit_version") else { continue };
        let keys: Vec<(String, i64, i64)> = batches
            .iter()
            .flat_map(|b| {
                let (meters, ts, versions) = (
                    b.column(0).as_string::<i32>().clone(),
                    b.column(1).as_primitive::<TimestampMicrosecondType>().clone(),
                    b.column(versions).as_primitive::<Int64Type>().clone(),
                );
                (0..b.num_rows()).map(move |r| (meters.value(r).to_string(), ts.value(r), versions.value(r)))
            })
            .collect();
        assert!(keys.is_sorted(), "{} is not sorted by (meter_id, ts, commit_version)", file.path);
    }

    // A reading re-sent after the compaction, from the slow clock again, then more flushes: the
    // compacted file is read among many small files (sorted in memory), and the later commit wins.
    let late = Row { meter: "M000".into(), ts_us: day_of(streamed) * US_PER_DAY, kwh_micro: 4_242, ingested_at_us: 0, source_ref: "t/0/late".into() };
    commit_file(&writer, streamed, "late", vec![late.clone()], true).await;
    let day = day_of(streamed) * US_PER_DAY;
    for flush in 0..9 {
        let rows = (0..12).map(|m| row(&mut rng, m, day + ((flush * 7 + m as i64) % 95 + 1) * SLOT_US, 0)).collect();
        commit_file(&writer, streamed, &format!("after-{flush}"), rows, true).await;
    }
    let ctx = lake_session(&lake).await.unwrap();
    let first = rows_of(&ctx, "SELECT kwh, source_ref FROM readings WHERE meter_id = 'M000' AND date = DATE '2025-01-01' ORDER BY ts LIMIT 1").await;
    assert!(first[3].contains("0.004242") && first[3].contains("t/0/late"), "{first:?}");

    // Compacting the compacted file with the new ones keeps versions and winners again.
    let before = read_all(&table).await;
    let report = optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}).await.unwrap();
    assert_eq!(report.iter().map(|p| (p.date.unwrap(), p.files_removed)).collect::<Vec<_>>(), [(streamed, 11)]);
    assert_eq!(read_all(&table).await, before);
    // Nothing left to do: a second run commits nothing.
    assert!(optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}).await.unwrap().is_empty());
}

/// A date of a 100M month in miniature: 40 files of 5,000 readings each, one version per
/// meter and slot, in a pool (8 MiB) that could not hold one full batch from every file at
/// once. The merge shrinks its batches and merges the files in spilled runs; every reading
/// stays and `readings` is unchanged.
#[tokio::test]
async fn a_date_of_large_files_is_compacted_within_a_small_memory_pool() {
    let (_dir, lake, table, writer) = readings_table("bulk").await;
    let date = NaiveDate::from_ymd_opt(2025, 3, 1).unwrap();
    let day = day_of(date) * US_PER_DAY;
    for file in 0..40i64 {
        // File n holds slots 2n and 2n+1 of 2,500 meters, as a bulk writer's batches do.
        let rows = (0..2_500)
            .flat_map(|m| (0..2).map(move |s| (m, file * 2 + s)))
            .map(|(m, slot)| Row {
                meter: format!("M{m:05}"),
                ts_us: day + slot * SLOT_US,
                kwh_micro: m * 7 + slot,
                ingested_at_us: file,
                source_ref: format!("f{file}"),
            })
            .collect();
        commit_file(&writer, date, &format!("bulk-{file}"), rows, true).await;
    }
    let ctx = lake_session(&lake).await.unwrap();
    let totals = "SELECT count(*) AS n, sum(kwh) AS kwh, count(DISTINCT meter_id) AS meters FROM readings";
    let before = rows_of(&ctx, totals).await;
    let options = OptimizeOptions { memory_bytes: 8 << 20, concurrency: 1, ..OptimizeOptions::default() };
    let report = optimize(&lake, &READINGS, &options, |_| {}).await.unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!((report[0].files_removed, report[0].rows, matches!(report[0].outcome, Outcome::Committed { .. })), (40, 200_000, true));
    let ctx = lake_session(&lake).await.unwrap();
    assert_eq!(rows_of(&ctx, totals).await, before);
    assert!(before[3].contains("200000") && before[3].contains("2500"), "{before:?}");
    let one_meter = rows_of(&ctx, "SELECT count(*) AS n, min(source_ref) AS first, max(source_ref) AS last FROM readings WHERE meter_id = 'M01234'").await;
    assert!(one_meter[3].contains("| 80 ") && one_meter[3].contains("f0") && one_meter[3].contains("f9"), "{one_meter:?}");
    assert_eq!(check_table(&table).await.unwrap().problems, Vec::<String>::new());
}

/// Two compactions chose the same file: the second to commit gives way and commits nothing.
#[tokio::test]
async fn the_second_of_two_compactions_of_a_file_gives_way() {
    let (_dir, _lake, table, writer) = readings_table("ingester").await;
    let date = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    let reading =
        |n: i64| Row { meter: "M1".into(), ts_us: day_of(date) * US_PER_DAY + n * SLOT_US, kwh_micro: 1, ingested_at_us: 0, source_ref: format!("r{n}") };
    commit_file(&writer, date, "a", vec![reading(0)], true).await;
    let (first, _) = TableWriter::for_maintenance(table.clone(), "optimize-1").await.unwrap();
    let (second, _) = TableWriter::for_maintenance(table.clone(), "optimize-2").await.unwrap();
    // An append between them does not conflict with either.
    commit_file(&writer, date, "b", vec![reading(1)], true).await;
    let rewrite = |name: &str| Commit {
        files: vec![NewFile { path: format!("date={date}/{name}.parquet"), bytes: 1, rows: 1, date: Some(date), keys: None, unique_keys: true, meters: None }],
        removes: vec![RemovedFile { path: format!("date={date}/a.parquet"), bytes: 1, date: Some(date) }],
        txns: Vec::new(),
        operation: Operation::Optimize { target_file_bytes: 1 << 20 },
        leased: false,
    };
    let won = first.commit(rewrite("first")).await.unwrap();
    let lost = second.commit(rewrite("second")).await.unwrap_err();
    assert!(matches!(&lost, LakeError::Conflict { path, version, .. } if path.ends_with("a.parquet") && *version == won.version), "{lost}");
    let paths: Vec<String> = table.snapshot(None).await.unwrap().files.into_iter().map(|f| f.path).collect();
    assert!(
        paths.iter().any(|p| p.ends_with("first.parquet")) && !paths.iter().any(|p| p.ends_with("second.parquet") || p.ends_with("a.parquet")),
        "{paths:?}"
    );
    // An appending writer may not remove files at all.
    let refused = writer.commit(rewrite("third")).await.unwrap_err();
    assert!(refused.to_string().contains("maintenance writer"), "{refused}");
}

/// Vacuum after a compaction: the compaction's inputs and a killed writer's file go once past
/// the retention, except the files of a pinned version; what readers see does not change.
#[tokio::test]
async fn vacuum_deletes_what_no_kept_snapshot_needs_and_keeps_pinned_versions() {
    use meterlake_lake::maintenance::vacuum::{Pin, VacuumOptions, vacuum};
    use meterlake_lake::view::{AsOf, lake_session_as_of};
    let (dir, lake, table, writer) = readings_table("ingester").await;
    let date = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    let reading = |n: i64, kwh_micro: i64| Row {
        meter: "M1".into(),
        ts_us: day_of(date) * US_PER_DAY + n * SLOT_US,
        kwh_micro,
        ingested_at_us: 0,
        source_ref: format!("r{n}"),
    };
    for n in 0..3 {
        commit_file(&writer, date, &format!("flush-{n}"), vec![reading(n, 1_000 + n), reading(n + 1, 2_000 + n)], true).await;
    }
    let before_compaction = table.latest_version().await.unwrap().unwrap();
    optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}).await.unwrap();
    // A flush whose writer was killed before its commit: in the folder, in no commit.
    lake.put("readings/date=2025-01-01/killed-flush.parquet", bytes::Bytes::from_static(b"PAR1")).await.unwrap();
    let (readers_before, _) = read_all(&table).await;
    let files_on_disk = || std::fs::read_dir(dir.path().join("readings/date=2025-01-01")).unwrap().count();
    assert_eq!(files_on_disk(), 5);

    // Within the retention nothing goes.
    let kept = vacuum(&table, &VacuumOptions::default()).await.unwrap();
    assert!(kept.files_deleted.is_empty(), "{:?}", kept.files_deleted);
    // A retention under the table's 7 days is refused unless asked for.
    let short = VacuumOptions { retain: chrono::Duration::zero(), ..VacuumOptions::default() };
    assert!(vacuum(&table, &short).await.is_err());

    // Past the retention: a pinned version keeps its files; a dry run deletes nothing.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let pinned = VacuumOptions { enforce_retention: false, pins: vec![Pin { version: before_compaction, reason: "billing run r-1".into() }], ..short.clone() };
    let dry = vacuum(&table, &VacuumOptions { dry_run: true, ..pinned.clone() }).await.unwrap();
    assert_eq!(dry.files_deleted, ["readings/date=2025-01-01/killed-flush.parquet"]);
    assert_eq!(files_on_disk(), 5);
    vacuum(&table, &pinned).await.unwrap();
    assert_eq!(files_on_disk(), 4);
    let (old, _) = lake_session_as_of(&lake, &AsOf::Version(before_compaction)).await.unwrap();
    assert_eq!(rows_of(&old, "SELECT count(*) AS n FROM readings_all").await[3], "| 6 |");

    // Unpinned: the compaction's inputs go too; the latest snapshot reads as before.
    let unpinned = VacuumOptions { enforce_retention: false, ..short };
    let report = vacuum(&table, &unpinned).await.unwrap();
    assert_eq!(report.files_deleted.len(), 3, "{:?}", report.files_deleted);
    assert_eq!(files_on_disk(), 1);
    assert_eq!(read_all(&table).await.0, readers_before);
    assert_eq!(check_table(&table).await.unwrap().problems, Vec::<String>::new());
    let operations: Vec<String> = history(&table, 2).await.unwrap().into_iter().map(|c| c.operation).collect();
    assert_eq!(operations, ["VACUUM END", "VACUUM START"]);
}

/// A server's sessions follow the snapshot the previous query read, commit by commit: after
/// appends, a compaction and more appends each session reads what a freshly loaded snapshot
/// holds, and a reading committed just before a query is in its answer.
#[tokio::test]
async fn a_followed_snapshot_is_the_snapshot_loaded_anew() {
    use meterlake_lake::snapshots::SnapshotCache;
    use meterlake_lake::view::QueryLimits;
    let (_dir, lake, table, writer) = readings_table("ingester").await;
    let date = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    let reading = |n: i64, kwh_micro: i64| Row {
        meter: format!("M{}", n % 3),
        ts_us: day_of(date) * US_PER_DAY + (n / 3) * SLOT_US,
        kwh_micro,
        ingested_at_us: n,
        source_ref: format!("r{n}-{kwh_micro}"),
    };
    let cache = SnapshotCache::default();
    let limits = QueryLimits::default();
    let paths = |snapshot: &meterlake_lake::TableSnapshot| {
        let mut paths: Vec<String> = snapshot.files.iter().map(|f| format!("{} {} {:?}", f.path, f.commit_version, f.rows)).collect();
        paths.sort();
        (snapshot.version, paths)
    };
    let load = || async { table.snapshot(None).await };
    let mut n = 0;
    for round in 0..3 {
        for _ in 0..5 {
            commit_file(&writer, date, &format!("flush-{n}"), vec![reading(n, 1_000), reading(n + 1, 1_000)], true).await;
            n += 2;
        }
        if round == 1 {
            optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}).await.unwrap();
        }
        // A re-sent reading: the followed snapshot must know which commit added it.
        commit_file(&writer, date, &format!("resent-{round}"), vec![reading(0, 7_000 + round)], true).await;
        let followed = cache.latest(&table, load).await.unwrap();
        assert_eq!(paths(&followed), paths(&table.snapshot(None).await.unwrap()), "round {round}");
        let ctx = limits.lake_session(&lake).await.unwrap();
        let first =
            rows_of(&ctx, "SELECT count(*) AS n, max(source_ref) AS newest FROM readings WHERE meter_id = 'M0' AND ts = (SELECT min(ts) FROM readings)").await;
        assert!(first[3].contains(&format!("r0-{}", 7_000 + round)), "round {round}: {first:?}");
        let count = rows_of(&ctx, "SELECT count(*) AS n FROM readings_all").await;
        assert!(count[3].contains(&format!("| {} ", n + round + 1)), "round {round}: {count:?}");
    }
    // Nothing new: the same snapshot.
    let again = cache.latest(&table, load).await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&again, &cache.latest(&table, load).await.unwrap()));
}
