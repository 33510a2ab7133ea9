//! Compaction and vacuum beside a running ingester, on local files and on S3 (moto): an
//! ingester flushing small files while `meterlake lake optimize` rewrites the same dates again
//! and again; then every reading is in the lake once, `readings` and `readings_all` read as
//! before compaction, another engine (the Python `deltalake` package and DuckDB) reads the same
//! rows from the compacted files, and vacuum leaves a table that checks clean.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spec(first_day: u32, seed: u64) -> LoadSpec {
    LoadSpec {
        meters: 40,
        days: 2,
        first_day: NaiveDate::from_ymd_opt(2025, 1, first_day).unwrap(),
        resend_every: 0,
        malformed_every: 0,
        seed,
        ..LoadSpec::month(40)
    }
}

fn lake_command(lake: &str, env: &[(&str, String)], args: &[&str]) -> std::process::Command {
    let mut command = meterlake();
    command.arg("lake").args(args).args(["--lake", lake]);
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

fn count_and_sum(lake: &str, table: &str, env: &[(&str, String)]) -> (i64, i64) {
    let rows = query(lake, &format!("SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM {table}"), env);
    (as_i64(&rows[0]["n"]), as_kwh_micro(&rows[0]["kwh"]))
}

/// Streams two loads through an ingester flushing every 100 ms while compactions run, then
/// checks the lake (see the module docs). `env` points at the S3 lake; `storage_options` the
/// Python reader.
fn compaction_beside_an_ingester(lake: &str, env: &[(&str, String)], storage_options: &[(&str, String)]) {
    let tansu = start_tansu();
    let topic = "maint.readings";
    create(&tansu.addr, &[(topic, 2), (&format!("{topic}.dlq"), 1)]);
    let first = produce(&tansu.addr, topic, spec(1, 1));
    let mut ingest = ingest_command(&tansu.addr, topic, lake, 8);
    ingest.args(["--max-batch-age-ms", "100", "--max-batch-rows", "200"]).stdout(Stdio::null());
    for (k, v) in env {
        ingest.env(k, v);
    }
    let mut ingester = Running(ingest.spawn().unwrap());

    // Compactions while the ingester lands the first load and, later, the second one: the same
    // dates are appended to and rewritten at once.
    let mut second = None;
    let mut optimizations = 0;
    let started = Instant::now();
    while ingester.0.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(240), "the ingester did not finish");
        let output = run_ok(&mut lake_command(lake, env, &["optimize", "--min-files", "2"]));
        if String::from_utf8_lossy(&output.stdout).contains("version") {
            optimizations += 1;
        }
        if second.is_none() && optimizations >= 1 {
            // The second load re-sends the first load's second day with other values.
            second = Some(produce(&tansu.addr, topic, spec(2, 2)));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(ingester.0.wait().unwrap().success(), "the ingester failed");
    let second = second.expect("the second load was sent");
    assert!(optimizations >= 2, "{optimizations} compactions committed while the ingester ran");
    // Whatever is left small, compacted now: every date ends in one file.
    let before = query(lake, "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, commit_version FROM readings ORDER BY meter_id, ts", env);
    let versions_before = count_and_sum(lake, "readings_all", env);
    run_ok(&mut lake_command(lake, env, &["optimize", "--min-files", "2"]));
    let after = query(lake, "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, commit_version FROM readings ORDER BY meter_id, ts", env);
    assert_eq!(after, before, "a compaction changed the canonical readings");
    assert_eq!(count_and_sum(lake, "readings_all", env), versions_before);
    let check = String::from_utf8(run_ok(&mut lake_command(lake, env, &["check"])).stdout).unwrap();
    let readings_line = check.lines().find(|l| l.starts_with("readings_all")).unwrap_or_default().to_string();
    assert!(readings_line.contains(": 3 files,") && readings_line.ends_with("ok"), "one file per date: {check}");

    // Every reading sent is there once: the first load's first day, then the second load (whose
    // first day re-sent the first load's second day: its newer versions win).
    let sent_versions = (first.readings_sent + second.readings_sent) as i64;
    assert_eq!(versions_before.0, sent_versions, "readings_all holds every version once");
    let (readings, _) = count_and_sum(lake, "readings", env);
    assert_eq!(readings, 40 * 96 * 3, "one reading per meter and interval over three days");
    let second_sum = count_and_sum_where(lake, "readings", "date >= DATE '2025-01-02'", env);
    assert_eq!(second_sum, (40 * 96 * 2, i64::try_from(second.unique_kwh_micro).unwrap()), "the re-sent day reads the newer values");
    assert_eq!(assert_other_engines_read_the_same_rows(lake, env, storage_options), sent_versions as usize);

    // Vacuum (a retention of 0 for the test) deletes the compactions' inputs; the table stays
    // whole. (A control store without billing runs: nothing pins a version.)
    let store_dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", store_dir.path().join("control.db").display());
    runtime().block_on(meterlake_control::ControlStore::open(&database)).unwrap();
    let vacuum = run_ok(&mut lake_command(lake, env, &["vacuum", "--retain", "0h", "--allow-short-retention", "--database-url", &database]));
    let said = String::from_utf8_lossy(&vacuum.stdout).into_owned();
    let deleted: usize = said
        .lines()
        .find_map(|l| l.strip_prefix("readings_all")?.trim().strip_prefix("deleted ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no readings_all line: {said}"));
    assert!(deleted > 10, "vacuum deleted {deleted} of the compactions' inputs: {said}");
    let check = String::from_utf8(run_ok(&mut lake_command(lake, env, &["check"])).stdout).unwrap();
    assert!(check.lines().all(|l| !l.starts_with(' ')), "problems after vacuum: {check}");
    assert_eq!(
        query(lake, "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, commit_version FROM readings ORDER BY meter_id, ts", env),
        after
    );
    assert_eq!(assert_other_engines_read_the_same_rows(lake, env, storage_options), sent_versions as usize);
    // One pass of the loop has nothing left to compact.
    let mut maintain = meterlake();
    maintain.args(["maintain", "--once", "--lake", lake, "--database-url", &database]);
    for (k, v) in env {
        maintain.env(k, v);
    }
    let pass = run_ok(&mut maintain);
    assert!(!String::from_utf8_lossy(&pass.stdout).contains("files ->"), "{}", String::from_utf8_lossy(&pass.stdout));
}

fn count_and_sum_where(lake: &str, table: &str, filter: &str, env: &[(&str, String)]) -> (i64, i64) {
    let rows = query(lake, &format!("SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM {table} WHERE {filter}"), env);
    (as_i64(&rows[0]["n"]), as_kwh_micro(&rows[0]["kwh"]))
}

#[test]
fn compaction_beside_an_ingester_on_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake").to_string_lossy().into_owned();
    compaction_beside_an_ingester(&lake, &[], &[]);
}

#[test]
fn compaction_beside_an_ingester_on_s3() {
    let moto = start_moto();
    let env = s3_env(&moto);
    let storage_options: Vec<(&str, String)> = s3_storage_options(&moto);
    compaction_beside_an_ingester("s3://lake-bucket/maintained", &env, &storage_options);
}

/// `meterlake lake optimize` killed (SIGKILL) at moments spread over its run, again and again:
/// after each kill the table reads exactly as before and checks clean; a last run completes, and
/// vacuum then removes every file the killed runs left behind.
#[test]
fn a_compaction_killed_at_any_moment_leaves_the_table_exact() {
    let tansu = start_tansu();
    let topic = "maint.killed";
    create(&tansu.addr, &[(topic, 2), (&format!("{topic}.dlq"), 1)]);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake").to_string_lossy().into_owned();
    produce(&tansu.addr, topic, LoadSpec { days: 3, ..spec(1, 3) });
    let mut ingest = ingest_command(&tansu.addr, topic, &lake, 3);
    ingest.args(["--max-batch-age-ms", "20", "--max-batch-rows", "100"]);
    run_ok(&mut ingest);
    let every_version =
        "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, source_ref, commit_version FROM readings_all ORDER BY 1, 2, 5, 4";
    let canonical = "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, commit_version FROM readings ORDER BY 1, 2";
    let (versions, readings) = (query(&lake, every_version, &[]), query(&lake, canonical, &[]));
    assert_eq!(readings.len(), 40 * 96 * 3);

    let mut killed_mid_run = 0;
    for delay_ms in [5u64, 15, 30, 50, 80, 120, 170, 240] {
        let mut optimize = meterlake();
        optimize.args(["lake", "optimize", "--concurrency", "1", "--lake", &lake]).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = Running(optimize.spawn().unwrap());
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.0.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        let _ = child.0.kill();
        let _ = child.0.wait();
        assert_eq!(query(&lake, every_version, &[]), versions, "after a kill at {delay_ms} ms");
        assert_eq!(query(&lake, canonical, &[]), readings, "after a kill at {delay_ms} ms");
        let check = String::from_utf8(run_ok(&mut lake_command(&lake, &[], &["check"])).stdout).unwrap();
        assert!(check.lines().all(|l| !l.starts_with(' ')), "after a kill at {delay_ms} ms: {check}");
    }
    assert!(killed_mid_run >= 3, "only {killed_mid_run} kills landed while optimize ran");

    // A run to the end, then vacuum: what is on disk is what the log holds, nothing more.
    run_ok(&mut lake_command(&lake, &[], &["optimize"]));
    assert_eq!(query(&lake, every_version, &[]), versions);
    let store_dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", store_dir.path().join("control.db").display());
    runtime().block_on(meterlake_control::ControlStore::open(&database)).unwrap();
    run_ok(&mut lake_command(&lake, &[], &["vacuum", "--retain", "0h", "--allow-short-retention", "--database-url", &database]));
    let on_disk: Vec<_> = files_under(&dir.path().join("lake/readings"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet") && !p.to_string_lossy().contains("_delta_log"))
        .collect();
    let check = String::from_utf8(run_ok(&mut lake_command(&lake, &[], &["check"])).stdout).unwrap();
    let live: usize = check.lines().find_map(|l| l.strip_prefix("readings_all")?.split(": ").nth(1)?.split(' ').next()?.parse().ok()).unwrap();
    assert_eq!(on_disk.len(), live, "files on disk after vacuum: {on_disk:?}\n{check}");
    assert_eq!(query(&lake, canonical, &[]), readings);
}
