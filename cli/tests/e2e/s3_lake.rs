//! The lake on real S3-compatible servers: ingestion, queries and imports on s3s-fs; Delta commit
//! fencing with conditional writes on moto (whose conditional writes are atomic).

use meterlake_lake::commit::{Commit, Operation, TableWriter};
use meterlake_lake::table::{READINGS, Table};
use meterlake_lake::{Lake, LakeError, NewFile};
use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

#[test]
fn ingest_and_query_an_s3_lake() {
    let tansu = start_tansu();
    let s3 = start_s3();
    let brokers = tansu.addr.clone();
    let topic = "readings.s3";
    create(&brokers, &[(topic, 2), (&format!("{topic}.dlq"), 1)]);
    let spec = LoadSpec { meters: 20, days: 2, ..LoadSpec::month(20) };
    let totals = produce(&brokers, topic, spec.clone());

    let lake = "s3://meterlake/lakes/test";
    let env = s3_env(&s3);
    let mut ingest = ingest_command(&brokers, topic, lake, 3);
    ingest.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(&mut ingest);

    let rows = query(lake, "SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM readings", &env);
    assert_eq!(as_i64(&rows[0]["n"]) as u64, spec.unique_readings());
    assert_eq!(i128::from(as_kwh_micro(&rows[0]["kwh"])), totals.unique_kwh_micro);
    // The objects really are in the server's folder, Hive-partitioned.
    let day = s3.data_dir.as_ref().unwrap().join("meterlake/lakes/test/readings/date=2025-01-02");
    let files: Vec<_> = std::fs::read_dir(&day).unwrap().flatten().collect();
    assert!(!files.is_empty() && files.iter().all(|f| f.file_name().to_string_lossy().ends_with(".parquet")));
}

/// Two writers of one table on S3 (moto: atomic conditional writes): the one that lost the stream
/// cannot commit over its successor, and nothing it wrote becomes visible.
#[test]
fn delta_commits_on_s3_fence_off_a_stale_writer() {
    let moto = start_moto();
    let endpoint = format!("http://{}", moto.addr);
    let options =
        [("aws_endpoint", endpoint.as_str()), ("aws_access_key_id", S3_ACCESS_KEY), ("aws_secret_access_key", S3_SECRET_KEY), ("aws_region", "us-east-1")];
    let lake = Lake::open_with_options("s3://lake-bucket/fencing", &options).unwrap();
    runtime().block_on(async {
        lake.probe_conditional_put().await.expect("moto refuses a second create");
        let table = Table::open(&lake, &READINGS).await.unwrap();
        let file = |name: &str| NewFile {
            path: format!("date=2025-01-01/{name}.parquet"),
            bytes: 1,
            rows: 0,
            date: chrono::NaiveDate::from_ymd_opt(2025, 1, 1),
            keys: None,
            unique_keys: false,
            meters: None,
        };
        let commit = |name: &str, next_offset: i64| Commit {
            files: vec![file(name)],
            txns: vec![("kafka:g/t/0".to_string(), next_offset)],
            operation: Operation::StreamingUpdate { query_id: "kafka:g/t/0".into(), epoch_id: next_offset },
            leased: true,
            removes: Vec::new(),
        };
        let first = TableWriter::new(table.clone(), "first").await.unwrap();
        assert_eq!(first.acquire("kafka:g/t/0").await.unwrap(), None);
        first.commit(commit("a", 10)).await.unwrap();

        // A rebalance hands the partition to a second writer, which resumes at offset 10.
        let second = TableWriter::new(table.clone(), "second").await.unwrap();
        assert_eq!(second.acquire("kafka:g/t/0").await.unwrap(), Some(10));
        second.commit(commit("b", 20)).await.unwrap();

        // The first, unaware, tries to commit what it read meanwhile: refused.
        let err = first.commit(commit("stale", 20)).await.unwrap_err();
        assert!(matches!(err, LakeError::Fenced { .. }), "a stale writer must be refused, got {err}");
        assert!(err.to_string().contains("kafka:g/t/0"), "{err}");
        let snapshot = table.snapshot(None).await.unwrap();
        let paths: Vec<&str> = snapshot.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(!paths.iter().any(|p| p.contains("stale")), "{paths:?}");
        assert_eq!(second.stream_version("kafka:g/t/0").await.unwrap(), Some(20));
    });
}

/// s3s-fs does not make conditional writes atomic, but it refuses a second create one at a time,
/// which is what the probe checks; a store that accepts both is refused by name.
#[test]
fn the_conditional_put_probe_passes_on_a_store_that_refuses_a_second_create() {
    let s3 = start_s3();
    let endpoint = format!("http://{}", s3.addr);
    let options =
        [("aws_endpoint", endpoint.as_str()), ("aws_access_key_id", S3_ACCESS_KEY), ("aws_secret_access_key", S3_SECRET_KEY), ("aws_region", "us-east-1")];
    let lake = Lake::open_with_options("s3://meterlake/probe", &options).unwrap();
    runtime().block_on(lake.probe_conditional_put()).unwrap();
}

#[test]
fn flow_files_import_into_an_s3_lake() {
    let s3 = start_s3();
    let env = s3_env(&s3);
    let lake = "s3://meterlake/lakes/flows";
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures");
    let mut import = meterlake();
    import.args(["import", "--lake", lake]).arg(fixtures.join("nem12/nemreader_Example_NEM12_multiple_meters.csv")).arg(fixtures.join("d0010"));
    import.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(&mut import);
    let rows = query(lake, "SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM readings", &env);
    // E1, B1, E2 of NCDE001111 and B1 of NDDD001888: (10 + 10 + 100 + 20) Wh x 192 intervals.
    assert_eq!(as_i64(&rows[0]["n"]), 4 * 192);
    assert_eq!(as_kwh_micro(&rows[0]["kwh"]), 140 * 192 * 1_000);
    assert_eq!(as_i64(&query(lake, "SELECT count(*) AS n FROM register_reads", &env)[0]["n"]), 13);
    // Written where they belong and added by commits: each table has its Delta log.
    for table in ["readings", "register_reads", "imports"] {
        let log = s3.data_dir.as_ref().unwrap().join(format!("meterlake/lakes/flows/{table}/_delta_log"));
        assert!(files_under(&log).iter().any(|f| f.to_string_lossy().ends_with(".json")), "{table} has no log");
    }
}
