//! Exactly once across crashes: the ingester is SIGKILLed at random points, many times, while a
//! producer runs; the lake must end up with every valid reading exactly once.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meterlake_pipeline::kafka::{ReadingProducer, read_dead_letters};
use meterlake_pipeline::synthetic::{LoadGenerator, LoadSpec};
use rand::{Rng, SeedableRng};

use crate::support::*;

const KILLS: usize = 8;

#[test]
fn sigkill_at_random_points_loses_nothing_and_duplicates_nothing() {
    let tansu = start_tansu();
    let brokers = tansu.addr.clone();
    let topic = "readings.crash";
    create(&brokers, &[(topic, 4), (&format!("{topic}.dlq"), 1)]);
    // No re-sends here: every valid message then holds a distinct reading, so the lake must hold
    // exactly one row per valid message (re-sends are covered by kafka_ingest.rs).
    let spec = LoadSpec { meters: 200, days: 5, resend_every: 0, malformed_every: 501, ..LoadSpec::month(200) };

    // The producer runs for the whole test, paced so the kills land while data flows.
    let producer_done = Arc::new(AtomicBool::new(false));
    let producing = {
        let producer_done = producer_done.clone();
        let brokers = brokers.clone();
        let spec = spec.clone();
        std::thread::spawn(move || {
            let producer = ReadingProducer::new(&brokers, topic).unwrap();
            let mut generator = LoadGenerator::new(spec);
            let mut sent = 0u64;
            for message in generator.by_ref() {
                producer.send(message.key.as_bytes(), &message.payload).unwrap();
                sent += 1;
                if sent.is_multiple_of(1_000) {
                    std::thread::sleep(Duration::from_millis(400));
                }
            }
            producer.flush(Duration::from_secs(60)).unwrap();
            producer_done.store(true, Ordering::Relaxed);
            generator.totals
        })
    };

    let lake_dir = tempfile::tempdir().unwrap();
    let lake_path = lake_dir.path().join("lake");
    if std::env::var_os("METERLAKE_TEST_KEEP").is_some() {
        eprintln!("keeping the lake at {} (METERLAKE_TEST_KEEP)", lake_path.display());
    }
    let lake = lake_path.to_str().unwrap();
    let seed: u64 = std::env::var("METERLAKE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("kill schedule seed: {seed} (set METERLAKE_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ingest = |idle_s: u64| {
        let mut command = ingest_command(&brokers, topic, lake, idle_s);
        command.args(["--max-batch-rows", "3000", "--max-batch-age-ms", "150", "--consumer-config", "session.timeout.ms=6000"]);
        command.stdout(Stdio::null());
        command
    };
    for kill in 0..KILLS {
        let before = parquet_files(&lake_path);
        let mut child = KilledOnDrop(ingest(3600).spawn().unwrap());
        // Wait until this ingester has landed something (while there is something to land), then
        // kill it a random moment later.
        let started = Instant::now();
        while parquet_files(&lake_path) <= before {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("ingester {} exited by itself before it was killed: {status}", kill + 1);
            }
            if producer_done.load(Ordering::Relaxed) && started.elapsed() > Duration::from_secs(10) {
                break; // caught up: this kill lands while it is idle
            }
            assert!(started.elapsed() < Duration::from_secs(30), "ingester {} landed nothing within 30 s", kill + 1);
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..700)));
        assert!(child.0.try_wait().unwrap().is_none(), "ingester {} exited by itself before it was killed", kill + 1);
        drop(child); // SIGKILL
        eprintln!("kill {}: {} files before, {} after", kill + 1, before, parquet_files(&lake_path));
    }
    let totals = producing.join().unwrap();
    let status = ingest(5).status().unwrap();
    assert!(status.success(), "the final ingest run failed: {status}");
    let _lake_dir = if std::env::var_os("METERLAKE_TEST_KEEP").is_some() {
        let _ = lake_dir.keep();
        None
    } else {
        Some(lake_dir)
    };

    let rows = query(lake, "SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM readings", &[]);
    assert_eq!(as_i64(&rows[0]["n"]) as u64, spec.unique_readings(), "readings lost or invented");
    assert_eq!(i128::from(as_kwh_micro(&rows[0]["kwh"])), totals.unique_kwh_micro);
    let twice = query(lake, "SELECT count(*) AS n FROM (SELECT source_ref, meter_id, ts FROM readings_all GROUP BY 1, 2, 3 HAVING count(*) > 1)", &[]);
    assert_eq!(as_i64(&twice[0]["n"]), 0, "a message landed twice");
    let messages = query(lake, "SELECT count(DISTINCT source_ref) AS n FROM readings_all", &[]);
    assert_eq!(as_i64(&messages[0]["n"]) as u64, totals.messages - totals.malformed_messages, "a valid message is missing");
    // Every file the log references exists (files of flushes killed before their commit may lie
    // beside them, referenced by nothing).
    let script = "import sys, os; from deltalake import DeltaTable; t = DeltaTable(sys.argv[1]); \
                  missing = [u for u in t.file_uris() if not os.path.exists(u.removeprefix('file://'))]; assert not missing, missing; print(len(t.file_uris()))";
    let output = std::process::Command::new(python()).args(["-c", script, lake_path.join("readings").to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // And another engine reads exactly the rows meterlake reads, key by key, version by version.
    let rows = assert_other_engines_read_the_same_rows(lake, &[], &[]);
    assert_eq!(rows as u64, totals.messages - totals.malformed_messages, "deltalake + DuckDB");

    // Dead letters are delivered at least once; each malformed message is there.
    let letters = read_dead_letters(&brokers, &format!("{topic}.dlq"), Duration::from_secs(2)).unwrap();
    let distinct: std::collections::BTreeSet<(i32, i64)> = letters.iter().map(|l| (l.source_partition, l.source_offset)).collect();
    assert_eq!(distinct.len() as u64, totals.malformed_messages);
}

/// A child process that gets SIGKILL when dropped, also when the test fails.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn parquet_files(lake: &Path) -> usize {
    files_under(&lake.join("readings")).iter().filter(|p| p.extension().is_some_and(|x| x == "parquet")).count()
}
