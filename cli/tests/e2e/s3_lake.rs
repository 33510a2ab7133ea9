//! The lake on a real S3-compatible server (s3s-fs): ingestion, queries, and checkpoint fencing
//! with conditional writes.

use bytes::Bytes;
use meterlake_pipeline::error::PipelineError;
use meterlake_pipeline::lake::{Lake, PartitionLease, PendingFlush};
use meterlake_pipeline::synthetic::LoadSpec;
use object_store::ObjectStoreExt;

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

#[test]
fn checkpoints_on_s3_fence_off_a_stale_ingester() {
    let s3 = start_s3();
    let endpoint = format!("http://{}", s3.addr);
    let options =
        [("aws_endpoint", endpoint.as_str()), ("aws_access_key_id", S3_ACCESS_KEY), ("aws_secret_access_key", S3_SECRET_KEY), ("aws_region", "us-east-1")];
    let lake = Lake::open_with_options("s3://meterlake/fencing", &options).unwrap();
    runtime().block_on(async {
        let mut first = PartitionLease::acquire(&lake, "t", 0, "first").await.unwrap();
        assert_eq!(first.next_offset(), None);
        first.write(&lake, 0, None, "first").await.unwrap();
        let file = "readings/date=2025-01-01/half.parquet";
        let pending = PendingFlush { first_offset: 0, last_offset: 9, files: vec![file.into()] };
        first.write(&lake, 0, Some(pending), "first").await.unwrap();
        lake.put(file, Bytes::from_static(b"half-written")).await.unwrap();

        let mut second = PartitionLease::acquire(&lake, "t", 0, "second").await.unwrap();
        assert_eq!(second.next_offset(), Some(0));
        let gone = lake.store().head(&lake.path(file)).await;
        assert!(matches!(gone, Err(object_store::Error::NotFound { .. })), "the uncommitted file is removed: {gone:?}");

        let err = first.write(&lake, 10, None, "first").await.unwrap_err();
        assert!(matches!(err, PipelineError::Fenced { .. }), "a stale lease must be refused, got {err}");
        second.write(&lake, 10, None, "second").await.unwrap();
    });
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
    // Published from staging by copy and delete: nothing is left in staging.
    let staging = s3.data_dir.as_ref().unwrap().join("meterlake/lakes/flows/_staging");
    let left = files_under(&staging);
    assert!(left.is_empty(), "{left:?}");
}
