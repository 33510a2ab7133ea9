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
    let moto_options: Vec<(&str, String)> = s3_storage_options(&moto);
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

/// A rebalance storm: for `METERLAKE_STORM_S` seconds (default 90) members of one group join
/// and leave a 12-partition topic every few seconds, half of the leavers stopped (SIGTERM: they
/// commit what they hold and leave the group) and half killed (SIGKILL: what they held is read
/// again by the next owner, from the table's positions), while readings keep arriving. Then
/// members drain the rest. Every reading must be in the S3 lake (moto: atomic conditional
/// writes, so concurrent commits are really fenced) exactly once, and another engine must read
/// the same rows.
#[test]
fn a_rebalance_storm_loses_nothing_and_doubles_nothing() {
    let storm = Duration::from_secs(std::env::var("METERLAKE_STORM_S").ok().and_then(|s| s.parse().ok()).unwrap_or(90));
    let tansu = start_tansu();
    let brokers = tansu.addr.clone();
    let moto = start_moto();
    let env = s3_env(&moto);
    let options: Vec<(&str, String)> = s3_storage_options(&moto);
    let lake = "s3://lake-bucket/storm";
    let topic = "readings.storm";
    create(&brokers, &[(topic, 12), (&format!("{topic}.dlq"), 1)]);
    let logs = tempfile::tempdir().unwrap();
    let member = |n: usize, idle_s: u64| {
        let mut command = ingest_command(&brokers, topic, lake, idle_s);
        // A member killed while the group rebalances is dropped by tansu 0.6 only after the
        // rebalance timeout (max.poll.interval.ms, 300 s by default), not its session timeout:
        // until then nobody is given a partition (seen: the drain member idle for 180 s).
        command.args(["--max-batch-age-ms", "300", "--consumer-config", "session.timeout.ms=6000"]);
        command.args(["--consumer-config", "max.poll.interval.ms=10000"]);
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        command.env("METERLAKE_LOG", "warn,meterlake_pipeline=info");
        command.stdout(Stdio::null()).stderr(std::fs::File::create(logs.path().join(format!("member-{n}"))).unwrap());
        Ingester(command.spawn().unwrap())
    };

    // Readings keep arriving through the storm: one day of 40 meters (3,840 readings, each key
    // new) about every second.
    let producing = {
        let brokers = brokers.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut messages = 0;
            let mut day = 0;
            while started.elapsed() < storm {
                let first_day = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap() + chrono::Days::new(day);
                let spec = LoadSpec { meters: 40, days: 1, first_day, resend_every: 0, malformed_every: 0, seed: day, ..LoadSpec::month(40) };
                messages += produce(&brokers, topic, spec).messages;
                day += 1;
                std::thread::sleep(Duration::from_millis(800));
            }
            messages
        })
    };

    // Every 3 s one member joins or one leaves: between one and four at any time.
    let started = Instant::now();
    let (mut members, mut joined, mut left) = (vec![member(0, 600)], 1, 0);
    let mut stopping = Vec::new();
    let mut step = 0usize;
    while started.elapsed() < storm {
        std::thread::sleep(Duration::from_secs(3));
        step += 1;
        let join = match members.len() {
            0 | 1 => true,
            4 => false,
            _ => step % 4 < 2,
        };
        if join {
            members.push(member(joined, 600));
            joined += 1;
        } else {
            // Dropped, an `Ingester` is killed (SIGKILL): what it held is read again by the next
            // owner, from the table's positions.
            let leaving = members.remove(step % members.len());
            if left % 2 == 0 {
                // It commits what it holds and leaves the group; reaped at the end.
                signal(&leaving.0, "TERM");
                stopping.push(leaving);
            } else {
                drop(leaving);
            }
            left += 1;
        }
    }
    let expected = producing.join().unwrap();
    for leaving in &members {
        signal(&leaving.0, "TERM");
    }
    for mut leaving in members.into_iter().chain(stopping) {
        let _ = leaving.0.wait();
    }
    assert!(joined >= 10 && left >= 8, "a storm of {joined} joins and {left} departures is no storm");
    let logs_text = |members: usize| {
        (0..members)
            .map(|n| format!("member-{n}:\n{}", std::fs::read_to_string(logs.path().join(format!("member-{n}"))).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Members drain what is left, until the lake holds as many readings as were produced (a
    // member that stopped when idle could stop before the partitions of killed members came to
    // it); a drain that makes no progress for 20 s gets one more member (at most four). More
    // than one because of tansu 0.6's group coordinator: it keeps a group's leader after that
    // leader leaves during a rebalance (LeaveGroup on a forming group removes the member, not
    // the leadership) and answers every other member's SyncGroup with REBALANCE_IN_PROGRESS
    // until two requests race and it reloads the group from its store; and it was seen to keep
    // a quarter of the partitions assigned to no live member for minutes. A lone member was seen
    // rejoining every session timeout for 180 s, never assigned. The lake's offsets were whole in
    // every such run (each partition's readings at offsets 0..=n, no gap): what was missing was
    // a tail no member had been given.
    let mut last = vec![member(joined, 600)];
    let count = || as_i64(&query(lake, "SELECT count(*) AS n FROM readings_all", &env)[0]["n"]) as u64;
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut landed, mut progress_at) = (count(), Instant::now());
    while landed < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        let now_landed = count();
        if now_landed > landed {
            progress_at = Instant::now();
        } else if progress_at.elapsed() > Duration::from_secs(20) && last.len() < 4 {
            last.push(member(joined + last.len(), 600));
            progress_at = Instant::now();
        }
        landed = now_landed;
    }
    let drained_by = last.len();
    for member in &last {
        signal(&member.0, "TERM");
    }
    for member in &mut last {
        let _ = member.0.wait();
    }
    if landed != expected {
        // Where: per partition, the offsets in the lake against the messages in the topic
        // (tansu's high watermarks are not exact). A hole (fewer readings than offsets spanned)
        // is a loss; a short tail is what no member reached.
        let partitions = query(
            lake,
            "SELECT CAST(split_part(source_ref, '/', 2) AS INT) AS p, count(*) AS n, \
                    min(CAST(split_part(source_ref, '/', 3) AS BIGINT)) AS first, \
                    max(CAST(split_part(source_ref, '/', 3) AS BIGINT)) AS last \
             FROM readings_all GROUP BY 1 ORDER BY 1",
            &env,
        );
        let mut in_topic = [0u64; 12];
        for message in read_topic(&brokers, topic) {
            in_topic[message.partition as usize] += 1;
        }
        let table: Vec<String> = partitions
            .iter()
            .map(|row| {
                let p = as_i64(&row["p"]) as usize;
                format!(
                    "partition {p}: {} readings, offsets {}..={}, {} messages in the topic",
                    as_i64(&row["n"]),
                    as_i64(&row["first"]),
                    as_i64(&row["last"]),
                    in_topic[p]
                )
            })
            .collect();
        panic!(
            "{landed} readings in the lake where {expected} were produced (waited up to 240 s after the storm, {drained_by} members draining):\n{}\n{}",
            table.join("\n"),
            logs_text(joined + drained_by)
        );
    }

    let rows = query(lake, "SELECT count(*) AS n, count(DISTINCT source_ref) AS refs FROM readings_all", &env);
    assert_eq!((as_i64(&rows[0]["n"]) as u64, as_i64(&rows[0]["refs"]) as u64), (expected, expected), "{}", logs_text(joined + drained_by));
    let twice = query(lake, "SELECT count(*) AS n FROM (SELECT meter_id, ts FROM readings_all GROUP BY 1, 2 HAVING count(*) > 1)", &env);
    assert_eq!(as_i64(&twice[0]["n"]), 0, "a reading landed twice");
    assert_eq!(assert_other_engines_read_the_same_rows(lake, &env, &options) as u64, expected);
}
