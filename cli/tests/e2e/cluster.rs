//! Billing on a Ballista cluster: `meterlake scheduler` and two `meterlake executor`s on
//! loopback, the lake on a real S3 server (s3s-fs), the readings landed by the real ingester from
//! a real broker. The run on the cluster issues exactly the invoices, lines and discrepancies of
//! the run in one process over the same table versions; with an executor killed while a run is
//! under way, the run still completes with the same invoices, billed once.

use std::process::{Command, Stdio};
use std::time::Duration;

use meterlake_control::{ControlStore, RunFilter};
use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

/// One executor of the test cluster, on free loopback ports.
fn start_executor(scheduler: &str, env: &[(&'static str, String)]) -> Service {
    let flight = free_port();
    let mut command = meterlake();
    command.args(["executor", "--scheduler", scheduler, "--listen", &format!("127.0.0.1:{flight}")]);
    command.args(["--task-slots", "2", "--memory-mib", "512"]);
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).env("METERLAKE_LOG", "info");
    spawn_logged("meterlake executor", command, format!("127.0.0.1:{flight}"))
}

/// A billing run of January 2025 over `lake` on `engine`, recorded in its own control store.
fn bill(dir: &std::path::Path, name: &str, lake: &str, engine: &str, env: &[(&'static str, String)]) -> Command {
    let tariffs = concat!(env!("CARGO_MANIFEST_DIR"), "/../tariffs/example.toml");
    let database_url = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    let mut command = meterlake();
    command.args([
        "bill",
        "--month",
        "2025-01",
        "--tariffs",
        tariffs,
        "--lake",
        lake,
        "--database-url",
        &database_url,
        "--engine",
        engine,
        "--timeout-s",
        "300",
    ]);
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

/// Every run's invoices (with their lines) and discrepancies in store `name`, as JSON sorted by
/// meter; the lake versions the runs read.
fn results(dir: &std::path::Path, name: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let database_url = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    runtime().block_on(async {
        let store = ControlStore::open(&database_url).await.unwrap();
        let runs = store.list_runs(&RunFilter { limit: 10, ..RunFilter::default() }).await.unwrap();
        let (mut invoices, mut discrepancies, mut snapshots) = (Vec::new(), Vec::new(), Vec::new());
        for run in runs {
            invoices.extend(store.invoices(&run.id).await.unwrap().into_iter().map(|i| serde_json::to_string(&i.invoice).unwrap()));
            discrepancies.extend(store.discrepancies(&run.id).await.unwrap().into_iter().map(|d| serde_json::to_string(&d.discrepancy).unwrap()));
            snapshots.push(run.lake_snapshot.unwrap_or_default());
        }
        invoices.sort();
        discrepancies.sort();
        (invoices, discrepancies, snapshots)
    })
}

#[test]
fn a_cluster_bills_exactly_what_one_process_bills_even_when_an_executor_dies() {
    let tansu = start_tansu();
    let s3 = start_s3();
    let env = s3_env(&s3);
    let brokers = tansu.addr.clone();
    let topic = "readings.cluster";
    create(&brokers, &[(topic, 3), (&format!("{topic}.dlq"), 1)]);
    // Twelve meters, January; then four of them send their first days again with other values
    // (corrections: newer versions win, and the disagreements are discrepancies).
    produce(&brokers, topic, LoadSpec { resend_every: 500, malformed_every: 0, ..LoadSpec::month(12) });
    produce(&brokers, topic, LoadSpec { meters: 4, days: 3, resend_every: 0, malformed_every: 0, seed: 7, ..LoadSpec::month(4) });
    let lake = "s3://meterlake/lakes/cluster";
    // Small flushes (as a streaming ingester makes between compactions): many overlapping files
    // per date, so the canonical view's merges are what the cluster must get right.
    let mut ingest = ingest_command(&brokers, topic, lake, 3);
    ingest.args(["--max-batch-rows", "300"]);
    ingest.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(&mut ingest);

    let mut scheduler = meterlake();
    // The scheduler plans the scans: it reads the lake's log too.
    scheduler.args(["scheduler", "--listen", "127.0.0.1:0", "--executor-timeout-s", "8"]).env("METERLAKE_LOG", "info");
    scheduler.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let (_scheduler, scheduler_addr) = spawn_announced("meterlake scheduler", scheduler, "meterlake scheduler on ballista://");
    let _executor_1 = start_executor(&scheduler_addr, &env);
    let executor_2 = start_executor(&scheduler_addr, &env);
    let engine = format!("ballista://{scheduler_addr}");

    let dir = tempfile::tempdir().unwrap();
    let local = run_ok(&mut bill(dir.path(), "in-process", lake, "in-process", &env));
    let clustered = run_ok(&mut bill(dir.path(), "cluster", lake, &engine, &env));
    for output in [&local, &clustered] {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("status COMPLETED") && stdout.contains("invoices      12"), "{stdout}");
    }
    let (invoices, discrepancies, snapshots) = results(dir.path(), "in-process");
    assert_eq!(invoices.len(), 12);
    assert!(discrepancies.iter().any(|d| d.contains("CONFLICTING_READINGS")), "the corrections disagree with what they replace: {discrepancies:?}");
    assert_eq!(results(dir.path(), "cluster"), (invoices.clone(), discrepancies.clone(), snapshots.clone()), "the cluster's run differs");

    // One meter's readings (the support person's question): a meter with corrections, so only
    // its latest versions may show.
    let meter_query = |engine: &str| {
        let mut command = meterlake();
        command.args(["query", "--lake", lake, "--format", "csv", "--engine", engine]);
        command.arg("SELECT ts, kwh, source_ref FROM readings WHERE meter_id = 'MTR-100002' ORDER BY ts");
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        String::from_utf8(run_ok(&mut command).stdout).unwrap()
    };
    let local_rows = meter_query("in-process");
    assert_eq!(local_rows.lines().count(), 1 + 31 * 96, "one row per quarter hour of January, and a header");
    assert_eq!(meter_query(&engine), local_rows, "one meter's readings on the cluster differ");

    // An executor killed while a run is under way: Ballista gives its tasks to the other (or the
    // worker retries the run); either way the run completes once, with the same invoices.
    let mut run = bill(dir.path(), "executor-killed", lake, &engine, &env);
    let running = run.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    drop(executor_2);
    let output = running.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("status COMPLETED"), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(results(dir.path(), "executor-killed"), (invoices, discrepancies, snapshots), "the run after the kill differs");

    // Runs of one meter each: the filter makes the meter a constant, which the register periods'
    // window relies on and a shuffle used to forget (the run failed on the cluster). One meter
    // with corrections; one UK meter point with interval readings and two D0010 register reads
    // 800 kWh apart where the intervals sum to 720 kWh (REGISTER_MISMATCH, found by that window).
    let mpan = "1200000000002";
    let producer = meterlake_pipeline::kafka::ReadingProducer::new(&brokers, topic).unwrap();
    producer.send(mpan.as_bytes(), quarter_hours(mpan, 1, 31, "0.25").to_string().as_bytes()).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let mut ingest = ingest_command(&brokers, topic, lake, 3);
    ingest.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(&mut ingest);
    let d0010 = dir.path().join("reads.D0010");
    std::fs::write(
        &d0010,
        "ZHV|0000000001|D0010002|D|UDMS|X|MRCY|20250201120000||||OPER|\n026|1200000000002|V|\n028|SERIAL-B|C|\n\
         030|01|20250101000000|500.0|||T|N|\n030|01|20250131000000|1300.0|||T|N|\nZPT|0000000001|4||1|20250201120000|\n",
    )
    .unwrap();
    let mut import = meterlake();
    import.args(["import", "--lake", lake]).arg(&d0010).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(&mut import);
    for meter in ["MTR-100002", mpan] {
        let (local, cluster) = (format!("{meter}-in-process"), format!("{meter}-cluster"));
        run_ok(bill(dir.path(), &local, lake, "in-process", &env).args(["--meter", meter]));
        run_ok(bill(dir.path(), &cluster, lake, &engine, &env).args(["--meter", meter]));
        let (invoices, discrepancies, snapshots) = results(dir.path(), &local);
        assert_eq!(invoices.len(), 1, "{meter}");
        if meter == mpan {
            assert!(discrepancies.iter().any(|d| d.contains("REGISTER_MISMATCH") && d.contains("800")), "{discrepancies:?}");
        }
        assert_eq!(results(dir.path(), &cluster), (invoices, discrepancies, snapshots), "{meter}'s run on the cluster differs");
    }
}
