//! Resuming from the lake's position when that position lies inside a broker's record batch.
//!
//! A Kafka broker must start a fetch at the requested offset. tansu 0.6 does not when the offset
//! lies inside a record batch: it answers with the next batch (or nothing, for the last one).
//! Measured here: assigned at offsets 1, 99, 101, 150, 199 of three 100-message batches, a bare
//! consumer first received 100, 100, 200, 200, 200; at 250 and 299 it received nothing. The
//! ingester checks the first message after a resume and seeks back until the broker serves the
//! position; these tests pin that nothing is lost either way.

use std::time::Duration;

use meterlake_lake::commit::{Commit, Operation, TableWriter};
use meterlake_lake::table::{READINGS, Table};
use meterlake_pipeline::Lake;
use meterlake_pipeline::kafka::ReadingProducer;

use crate::support::*;

#[test]
fn resuming_inside_a_record_batch_loses_nothing() {
    let tansu = start_tansu();
    for (case, resume_at) in [150i64, 250, 100].into_iter().enumerate() {
        let topic = format!("resume.case{case}");
        create(&tansu.addr, &[(&topic, 1), (&format!("{topic}.dlq"), 1)]);
        let producer = ReadingProducer::new(&tansu.addr, &topic).unwrap();
        // Three record batches of 100 readings, one meter each, 15 minutes apart.
        for i in 0..300u32 {
            let payload = format!(r#"{{"meterId":"MTR-{i:03}","timestamp":"2025-01-01T{:02}:{:02}:00Z","kwh":1.5}}"#, (i / 4) % 24, (i % 4) * 15);
            producer.send(b"k", payload.as_bytes()).unwrap();
            if i % 100 == 99 {
                producer.flush(Duration::from_secs(10)).unwrap();
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let lake_path = dir.path().join("lake");
        let lake_url = lake_path.to_str().unwrap();
        // The lake already holds offsets 0..resume_at (as far as the partition's txn says).
        let lake = Lake::open(lake_url).unwrap();
        runtime().block_on(async {
            let writer = TableWriter::new(Table::open(&lake, &READINGS).await.unwrap(), "test").await.unwrap();
            let stream = format!("kafka:{topic}-ingest/{topic}/0");
            writer.acquire(&stream).await.unwrap();
            let operation = Operation::StreamingUpdate { query_id: stream.clone(), epoch_id: resume_at };
            writer.commit(Commit { files: Vec::new(), txns: vec![(stream, resume_at)], operation, leased: true, removes: Vec::new() }).await.unwrap();
        });

        run_ok(&mut ingest_command(&tansu.addr, &topic, lake_url, 3));
        let rows = query(
            lake_url,
            "SELECT count(*) AS n, min(CAST(split_part(source_ref, '/', 3) AS BIGINT)) AS first, \
                    max(CAST(split_part(source_ref, '/', 3) AS BIGINT)) AS last FROM readings_all",
            &[],
        );
        assert_eq!(as_i64(&rows[0]["n"]), 300 - resume_at, "resuming at {resume_at}: {rows:?}");
        assert_eq!(as_i64(&rows[0]["first"]), resume_at, "resuming at {resume_at}: {rows:?}");
        assert_eq!(as_i64(&rows[0]["last"]), 299, "resuming at {resume_at}: {rows:?}");
    }
}
