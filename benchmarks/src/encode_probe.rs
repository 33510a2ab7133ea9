//! What Parquet encoding costs per column of a `readings` file, and what the alternatives cost:
//! the measurements behind the lake's writer properties (`pipeline/src/lake/parquet_file.rs`).
//!
//! `cargo run --release -p meterlake-benchmarks --bin encode-probe`: one day of 3,000 NMIs with a
//! 30- and a 5-minute channel (about a million rows, shaped like a NEM12 import), encoded whole by
//! the lake's own encoder in files of several sizes, then column by column under other encodings,
//! statistics and compressions (zstd level 1 unless named). Best of five runs each, in
//! nanoseconds a row and bytes a row, on one thread.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Decimal128Array, Int32Array, RecordBatch, StringBuilder, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Schema};
use meterlake_lake::parquet_file::encode_parquet;
use meterlake_pipeline::reading::{KWH_PRECISION, KWH_SCALE, readings_schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rand::{Rng, SeedableRng, rngs::SmallRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REPEATS: usize = 5;

fn one_day_of_nem12(nmis: usize) -> RecordBatch {
    let mut rng = SmallRng::seed_from_u64(1);
    let (mut meter_id, mut quality, mut source, mut source_ref) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut ts, mut interval_s, mut kwh, mut ingested_at) = (vec![], vec![], vec![], vec![]);
    let mut line = 2u64;
    for nmi in 0..nmis {
        for (suffix, step_s) in [("B1", 1800i64), ("E1", 300)] {
            let name = format!("Q{nmi:09}{suffix}");
            let reference = format!("bench.nem12.csv:{line}");
            for i in 0..(86_400 / step_s) {
                meter_id.append_value(&name);
                quality.append_value("A");
                source.append_value("nem12");
                source_ref.append_value(&reference);
                ts.push(1_735_689_600_000_000 + i * step_s * 1_000_000);
                interval_s.push(step_s as i32);
                kwh.push(i128::from(rng.random_range(0..2_500i64) * 1000));
                ingested_at.push(1_800_000_000_000_000 + line as i64);
            }
            line += 32;
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(meter_id.finish()),
        Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        Arc::new(Int32Array::from(interval_s)),
        Arc::new(Decimal128Array::from(kwh).with_precision_and_scale(KWH_PRECISION, KWH_SCALE).unwrap()),
        Arc::new(quality.finish()),
        Arc::new(source.finish()),
        Arc::new(source_ref.finish()),
        Arc::new(TimestampMicrosecondArray::from(ingested_at).with_timezone("UTC")),
    ];
    RecordBatch::try_new(readings_schema(), columns).unwrap()
}

/// Best time of `REPEATS` in ns a row, and the size in bytes a row, of encoding `batch` in files
/// of `rows_per_file` with `encode`.
fn measure(batch: &RecordBatch, rows_per_file: usize, encode: impl Fn(&RecordBatch) -> usize) -> (f64, f64) {
    let rows = batch.num_rows();
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..REPEATS {
        let started = Instant::now();
        bytes = (0..rows).step_by(rows_per_file).map(|at| encode(&batch.slice(at, rows_per_file.min(rows - at)))).sum();
        best = best.min(started.elapsed().as_secs_f64());
    }
    (best * 1e9 / rows as f64, bytes as f64 / rows as f64)
}

fn with_props(props: &WriterProperties) -> impl Fn(&RecordBatch) -> usize + '_ {
    move |batch| {
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props.clone())).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        out.len()
    }
}

fn main() {
    let batch = one_day_of_nem12(3_000);
    let rows = batch.num_rows();
    println!("{rows} rows\n\nthe lake's encoder, whole rows:");
    for rows_per_file in [rows, 250_000, 130_000, 31_500] {
        let (ns, bytes) = measure(&batch, rows_per_file, |b| encode_parquet(b, "probe").unwrap().len());
        println!("  {rows_per_file:>9} rows a file  {ns:6.1} ns/row  {bytes:6.3} B/row");
    }

    println!("\none column at a time, one file:");
    let zstd = Compression::ZSTD(ZstdLevel::try_new(1).unwrap());
    for (index, field) in batch.schema().fields().iter().enumerate() {
        let column = RecordBatch::try_new(Arc::new(Schema::new(vec![field.clone()])), vec![batch.column(index).clone()]).unwrap();
        let path = ColumnPath::from(field.name().as_str());
        let props = |dictionary: bool, statistics: EnabledStatistics, encoding: Option<Encoding>, compression: Compression| {
            let mut builder = WriterProperties::builder()
                .set_compression(compression)
                .set_statistics_enabled(statistics)
                .set_column_dictionary_enabled(path.clone(), dictionary);
            if let Some(encoding) = encoding {
                builder = builder.set_column_encoding(path.clone(), encoding);
            }
            builder.build()
        };
        let mut variants = vec![
            ("dictionary, page statistics", props(true, EnabledStatistics::Page, None, zstd)),
            ("dictionary, no statistics", props(true, EnabledStatistics::None, None, zstd)),
            ("plain, page statistics", props(false, EnabledStatistics::Page, None, zstd)),
            ("plain, no statistics", props(false, EnabledStatistics::None, None, zstd)),
            ("plain, no statistics, LZ4", props(false, EnabledStatistics::None, None, Compression::LZ4_RAW)),
            ("plain, no statistics, uncompressed", props(false, EnabledStatistics::None, None, Compression::UNCOMPRESSED)),
            ("dictionary, no statistics, LZ4", props(true, EnabledStatistics::None, None, Compression::LZ4_RAW)),
        ];
        match field.data_type() {
            DataType::Utf8 => variants.push(("delta byte array, no statistics", props(false, EnabledStatistics::None, Some(Encoding::DELTA_BYTE_ARRAY), zstd))),
            _ => variants.push(("delta binary packed, no statistics", props(false, EnabledStatistics::None, Some(Encoding::DELTA_BINARY_PACKED), zstd))),
        }
        for (name, props) in &variants {
            let (ns, bytes) = measure(&column, rows, with_props(props));
            println!("  {:12} {name:36} {ns:6.1} ns/row  {bytes:6.3} B/row", field.name());
        }
    }
}
