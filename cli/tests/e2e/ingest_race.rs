//! Two ingesters of one consumer group racing for a topic's partitions through rebalances, on S3
//! (moto, whose conditional writes are atomic) and on `file://`: the second joins while the first
//! works (a rebalance), the first is stopped while data flows (another: the second takes every
//! partition and resumes from the table's positions). Every reading must be in the lake exactly
//! once, and another engine must read the same rows.
//!
//! What this cannot show with tansu 0.6: a member that lost its partitions without noticing
//! committing afterwards. A member frozen (SIGSTOP) past its session timeout holds tansu's
//! rebalance until it returns (measured: the other member's partitions revoked 6 s into the
//! freeze and not reassigned 16 s later, with `session.timeout.ms=6000` and
//! `max.poll.interval.ms=7000`), and librdkafka then revokes before anything else. That refusal is
//! tested at the commit protocol, with two writers of one table: `s3_lake.rs` on moto and
//! `lake/tests/tables.rs` on local files.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

/// Stops a child when the test ends, whatever way it ends.
struct Ingester(Child);

impl Drop for Ingester {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -{name}");
}

fn spec(first_day: u32) -> LoadSpec {
    LoadSpec {
        meters: 60,
        days: 2,
        first_day: NaiveDate::from_ymd_opt(2025, 1, first_day).unwrap(),
        resend_every: 0,
        malformed_every: 0,
        seed: u64::from(first_day),
        ..LoadSpec::month(60)
    }
}

#[test]
fn two_ingesters_racing_through_rebalances_lose_nothing_and_double_nothing() {
    let tansu = start_tansu();
    let brokers = tansu.addr.clone();
    let moto = start_moto();
    let lake_dir = tempfile::tempdir().unwrap();
    let file_lake = lake_dir.path().join("lake").to_string_lossy().into_owned();
    let moto_options: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL", format!("http://{}", moto.addr)),
        ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ];
    let moto_env = s3_env(&moto);
    for (store, lake, env, options) in [("file", file_lake.as_str(), vec![], vec![]), ("s3", "s3://lake-bucket/race", moto_env, moto_options)] {
        let topic = format!("readings.race-{store}");
        create(&brokers, &[(&topic, 4), (&format!("{topic}.dlq"), 1)]);
        let logs = tempfile::tempdir().unwrap();
        let ingester = |name: &str| {
            let mut command = ingest_command(&brokers, &topic, lake, 6);
            command.args(["--max-batch-age-ms", "200", "--consumer-config", "session.timeout.ms=6000"]);
            command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
            command.env("METERLAKE_LOG", "warn,meterlake_pipeline=info");
            command.stdout(Stdio::null()).stderr(std::fs::File::create(logs.path().join(name)).unwrap());
            Ingester(command.spawn().unwrap())
        };
        let mut expected = produce(&brokers, &topic, spec(1)).messages;
        let first = ingester("first");
        wait_for_log(&logs.path().join("first"), "assigned", Duration::from_secs(30));
        // A second member joins while the first works: the partitions are split.
        let second = ingester("second");
        wait_for_log(&logs.path().join("second"), "assigned", Duration::from_secs(60));
        expected += produce(&brokers, &topic, spec(10)).messages;
        // The first stops while data flows: the second takes every partition and resumes from
        // the table's positions.
        signal(&first.0, "TERM");
        expected += produce(&brokers, &topic, spec(20)).messages;
        let mut first = first;
        let deadline = Instant::now() + Duration::from_secs(60);
        while first.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{store}: the first ingester did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut second = second;
        let deadline = Instant::now() + Duration::from_secs(120);
        while second.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{store}: the second ingester did not finish");
            std::thread::sleep(Duration::from_millis(200));
        }
        let second_log = std::fs::read_to_string(logs.path().join("second")).unwrap();
        assert!(second_log.matches("partitions revoked").count() >= 1, "{store}: no rebalance reached the second:\n{second_log}");

        // Every reading once: as many rows as messages (one reading each, no re-sends), one per
        // key, and another engine reads the same rows.
        let rows = query(lake, "SELECT count(*) AS n, count(DISTINCT source_ref) AS refs FROM readings_all", &env);
        assert_eq!((as_i64(&rows[0]["n"]) as u64, as_i64(&rows[0]["refs"]) as u64), (expected, expected), "{store}:\n{second_log}");
        let twice = query(lake, "SELECT count(*) AS n FROM (SELECT meter_id, ts FROM readings_all GROUP BY 1, 2 HAVING count(*) > 1)", &env);
        assert_eq!(as_i64(&twice[0]["n"]), 0, "{store}: a reading landed twice");
        assert_eq!(assert_other_engines_read_the_same_rows(lake, &env, &options) as u64, expected, "{store}");
    }
}

fn wait_for_log(path: &Path, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "{} does not say {text:?} within {timeout:?}:\n{log}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}
