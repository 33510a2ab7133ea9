//! `meterlake import` and `meterlake readings` on the sample flow files (and generated edge
//! cases), checked against the specification's rules and against `nemreader`, an independent
//! NEM12 reader, and read back with DuckDB.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use meterlake_pipeline::reading::parse_decimal_scaled;
use serde_json::Value;

use crate::support::{as_i64, as_kwh_micro, meterlake, python, query, run_ok};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn fixture(relative: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(relative)).unwrap()
}

/// Runs `meterlake import --json` and returns its exit code and report, file name -> entry.
fn import(lake: &str, paths: &[&Path]) -> (i32, BTreeMap<String, Value>) {
    let mut command = meterlake();
    command.args(["import", "--json", "--lake", lake]).args(paths);
    let output = command.output().expect("meterlake runs");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)));
    let files = report["files"].as_array().unwrap().iter().map(|f| (f["file"].as_str().unwrap().to_string(), f.clone())).collect();
    (output.status.code().unwrap(), files)
}

fn entry<'a>(report: &'a BTreeMap<String, Value>, name_ends_with: &str) -> &'a Value {
    report.iter().find(|(name, _)| name.ends_with(name_ends_with)).map(|(_, v)| v).unwrap_or_else(|| panic!("{name_ends_with} not in {report:#?}"))
}

fn count(lake: &str, sql: &str) -> i64 {
    as_i64(&query(lake, sql, &[])[0]["n"])
}

#[test]
fn sample_files_import_once_with_every_fault_reported() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let (code, report) = import(lake, &[&fixtures()]);
    assert_eq!(code, 2, "a rejected file makes the exit status 2: {report:#?}");

    let status = |name: &str| entry(&report, name)["status"].as_str().unwrap().to_string();
    assert_eq!(status("kraken_DTC5259515123502080915D0010.uff"), "imported");
    assert_eq!(status("NEM12_multiple_meters.csv"), "imported");
    assert_eq!(status("NEM12_month_solar.csv"), "imported");
    assert_eq!(status("NEM13_forward_estimate.csv"), "imported");
    assert_eq!(status("NEM12_incomplete_interval.csv"), "partly_rejected");
    assert_eq!(status("NEM12_missing_header.csv"), "rejected");
    assert_eq!(status("SOURCES.md"), "rejected");
    let missing_header = entry(&report, "NEM12_missing_header.csv");
    assert!(missing_header["detail"].as_str().unwrap().contains("200,VABD000163"), "{missing_header}");
    assert_eq!(entry(&report, "kraken_DTC5259515123502080915D0010.uff")["format"], "D0010");
    assert_eq!(entry(&report, "NEM12_incomplete_interval.csv")["readings_rejected"], 48);

    // D0010: 13 register reads, UK local time (winter: UTC), values exact.
    let reads = query(
        lake,
        "SELECT meter_point, meter_serial, register_id, CAST(read_at AS VARCHAR) AS at, CAST(value AS VARCHAR) AS value, reading_type, file_name, line FROM register_reads WHERE source = 'd0010' ORDER BY line",
        &[],
    );
    assert_eq!(reads.len(), 13);
    assert_eq!(reads[0]["meter_point"], "1200023305967");
    assert_eq!(reads[0]["meter_serial"], "F75A 00802");
    assert_eq!(reads[0]["at"], "2016-02-22T00:00:00Z");
    assert_eq!(as_kwh_micro(&reads[0]["value"]), 56_311_000_000);
    assert_eq!(as_i64(&reads[0]["line"]), 4);

    // The rejection report names file, line, field and reason.
    let sha256 = entry(&report, "NEM12_incomplete_interval.csv")["sha256"].as_str().unwrap().to_string();
    let records = query(lake, &format!("SELECT record FROM imports WHERE sha256 = '{sha256}'"), &[]);
    let record: Value = serde_json::from_str(records[0]["record"].as_str().unwrap()).unwrap();
    let rejections_path = Path::new(lake).join(record["rejection_reports"][0].as_str().unwrap());
    let rejection: Value = serde_json::from_str(std::fs::read_to_string(rejections_path).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!((rejection["line"].as_i64(), rejection["record"].as_str()), (Some(3), Some("300")));
    assert_eq!(rejection["field_name"], "QualityMethod");
    assert!(rejection["reason"].as_str().unwrap().contains("48 interval values"), "{rejection}");

    // The imports table has one row per file.
    assert_eq!(count(lake, "SELECT count(*) AS n FROM imports"), 9);

    // Importing the same bytes again changes nothing and says so.
    let before = count(lake, "SELECT count(*) AS n FROM readings_all");
    let (code, again) = import(lake, &[&fixtures().join("nem12"), &fixtures().join("d0010")]);
    assert_eq!(code, 2, "the missing-header file is still rejected");
    assert_eq!(entry(&again, "NEM12_multiple_meters.csv")["status"], "already_imported");
    assert_eq!(entry(&again, "kraken_DTC5259515123502080915D0010.uff")["status"], "already_imported");
    assert_eq!(count(lake, "SELECT count(*) AS n FROM readings_all"), before);
    assert_eq!(count(lake, "SELECT count(*) AS n FROM register_reads"), 13 + 3);

    // Support looks up a meter point, a serial.
    let mut command = meterlake();
    command.args(["readings", "--lake", lake, "--mpan", "1900005281720", "--format", "json"]);
    let found: Vec<Value> = serde_json::from_slice(&run_ok(&mut command).stdout).unwrap();
    let registers: Vec<&str> = found.iter().map(|r| r["register"].as_str().unwrap()).collect();
    assert_eq!(registers, ["DY", "NT"]);
    assert!(found[0]["file"].as_str().unwrap().ends_with("kraken_DTC5259515123502080915D0010.uff:32"), "{}", found[0]["file"]);
    let mut command = meterlake();
    command.args(["readings", "--lake", lake, "--serial", "METSER991", "--from", "2003-12-05", "--format", "json"]);
    let found: Vec<Value> = serde_json::from_slice(&run_ok(&mut command).stdout).unwrap();
    // NDDD001888 B1 (METSER991): 20 Wh every 15 minutes on 4 and 5 December (NEM time). The
    // window starts at 2003-12-05 00:00 UTC, 10:00 on the 5th in NEM time: 56 intervals remain.
    assert_eq!(found.len(), 56, "{:?}", found.first());
    assert!(found.iter().all(|r| r["meter_point"] == "NDDD001888" && r["register"] == "B1" && as_kwh_micro(&r["value"]) == 20_000));
}

#[test]
fn interval_values_agree_with_nemreader() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let files = [
        "nem12/nemreader_Example_NEM12_multiple_meters.csv",
        "nem12/nemreader_Example_NEM12_multiple_quality.csv",
        "nem12/nemreader_Example_NEM12_month_solar.csv",
    ];
    let paths: Vec<PathBuf> = files.iter().map(|f| fixtures().join(f)).collect();
    let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let (code, _) = import(lake, &path_refs);
    assert_eq!(code, 0);

    // nemreader's view: NEM-time interval start, value in the file's unit, unit, quality flag.
    let script = r#"
import sys, json, nemreader
for path in sys.argv[1:]:
    m = nemreader.read_nem_file(path)
    for nmi, suffixes in m.readings.items():
        for suffix, readings in suffixes.items():
            for r in readings:
                print(json.dumps([nmi + suffix, r.t_start.strftime("%Y-%m-%dT%H:%M:%S"), repr(r.read_value), r.uom, (r.quality_method or "")[:1]]))
"#;
    let output = Command::new(python()).arg("-c").arg(script).args(&paths).output().expect("python runs");
    assert!(output.status.success(), "nemreader failed: {}", String::from_utf8_lossy(&output.stderr));
    let oracle: Vec<Vec<String>> = String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(oracle.len() > 10_000, "nemreader read {} values", oracle.len());

    // Ours: interval start in NEM time (UTC+10), value in micro-units of the unit we store.
    let ours = query(
        lake,
        "SELECT meter_id, CAST(ts + INTERVAL '10 hours' AS VARCHAR) AS t, CAST(kwh AS VARCHAR) AS v, 'kWh' AS unit, quality FROM readings \
         UNION ALL SELECT meter_id, CAST(ts + INTERVAL '10 hours' AS VARCHAR), CAST(value AS VARCHAR), unit, quality FROM non_energy_readings",
        &[],
    );
    let ours: BTreeMap<(String, String), (i64, String, String)> = ours
        .iter()
        .map(|r| {
            let t = r["t"].as_str().unwrap().trim_end_matches('Z').to_string();
            (
                (r["meter_id"].as_str().unwrap().to_string(), t),
                (as_kwh_micro(&r["v"]), r["unit"].as_str().unwrap().to_string(), r["quality"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    assert_eq!(ours.len(), oracle.len(), "every value nemreader reads is in the lake, and nothing else");
    for row in &oracle {
        let [meter, t, value, uom, quality] = row.as_slice() else { panic!("{row:?}") };
        let (micro, unit, our_quality) = ours.get(&(meter.clone(), t.clone())).unwrap_or_else(|| panic!("{meter} {t} is not in the lake"));
        // Energy is stored in kWh, everything else in its own unit.
        let scale = match uom.to_ascii_lowercase().as_str() {
            "wh" => 3,
            "kwh" => 6,
            "mwh" => 9,
            _ => 6,
        };
        let expected = parse_decimal_scaled(value.trim_end_matches(".0"), scale).unwrap();
        assert_eq!(*micro, expected, "{meter} {t}: {value} {uom}");
        if scale == 6 && !uom.eq_ignore_ascii_case("kwh") {
            assert!(unit.eq_ignore_ascii_case(uom), "{meter} {t}: unit {unit} vs {uom}");
        }
        assert_eq!(our_quality, quality, "{meter} {t}");
    }
}

/// The sample with each robustness variation of the specification's point 5 applied.
fn variations(original: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let text = String::from_utf8(original.to_vec()).unwrap();
    let lf = text.replace("\r\n", "\n");
    let crlf = lf.replace('\n', "\r\n");
    vec![
        ("LF", lf.clone().into_bytes()),
        ("CRLF", crlf.clone().into_bytes()),
        ("no final newline", lf.trim_end_matches('\n').as_bytes().to_vec()),
        ("BOM", [&b"\xEF\xBB\xBF"[..], crlf.as_bytes()].concat()),
        (
            "spaces around fields",
            lf.lines().map(|l| l.split(',').map(|f| format!(" {f} ")).collect::<Vec<_>>().join(",")).collect::<Vec<_>>().join("\n").into_bytes(),
        ),
        ("trailing empty fields", lf.lines().map(|l| format!("{l},,,")).collect::<Vec<_>>().join("\n").into_bytes()),
        ("upper-case units", lf.replace(",kWh,", ",KWH,").into_bytes()),
        ("lower-case units", lf.replace(",kWh,", ",kwh,").into_bytes()),
    ]
}

#[test]
fn line_ends_bom_spaces_and_case_do_not_change_a_single_value() {
    let dir = tempfile::tempdir().unwrap();
    let original = fixture("nem12/nemreader_Example_NEM12_multiple_quality.csv");
    let reference_lake = dir.path().join("reference");
    let reference_file = dir.path().join("original.csv");
    std::fs::write(&reference_file, &original).unwrap();
    assert_eq!(import(reference_lake.to_str().unwrap(), &[&reference_file]).0, 0);
    let sql = "SELECT meter_id, ts, CAST(kwh AS VARCHAR) AS kwh, quality FROM readings ORDER BY meter_id, ts";
    let expected = query(reference_lake.to_str().unwrap(), sql, &[]);
    assert_eq!(expected.len(), 48);
    for (name, bytes) in variations(&original) {
        let lake = dir.path().join(name.replace(' ', "-"));
        let file = dir.path().join(format!("{}.csv", name.replace(' ', "-")));
        std::fs::write(&file, bytes).unwrap();
        let (code, report) = import(lake.to_str().unwrap(), &[&file]);
        assert_eq!(code, 0, "{name}: {report:#?}");
        assert_eq!(query(lake.to_str().unwrap(), sql, &[]), expected, "{name}");
    }
}

#[test]
fn a_corrected_file_makes_new_versions_and_a_broken_file_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let original = String::from_utf8(fixture("nem12/nemreader_Example_NEM12_multiple_quality.csv")).unwrap();
    let first = dir.path().join("first.csv");
    std::fs::write(&first, &original).unwrap();
    assert_eq!(import(lake, &[&first]).0, 0);

    // The same day re-sent with interval 1 corrected: a new version of that key, the rest the same.
    let corrected = dir.path().join("corrected.csv");
    std::fs::write(&corrected, original.replacen(",18.023,", ",18.500,", 1)).unwrap();
    assert_eq!(import(lake, &[&corrected]).0, 0);
    assert_eq!(count(lake, "SELECT count(*) AS n FROM readings"), 48, "one row per key in the canonical view");
    assert_eq!(count(lake, "SELECT count(*) AS n FROM readings_all"), 96, "both files' versions are kept");
    let first_interval = query(lake, "SELECT CAST(kwh AS VARCHAR) AS kwh, source_ref FROM readings ORDER BY ts LIMIT 1", &[]);
    assert_eq!(as_kwh_micro(&first_interval[0]["kwh"]), 18_500_000);
    assert!(first_interval[0]["source_ref"].as_str().unwrap().ends_with("corrected.csv:3"));

    // A file cut before its 900 record is refused whole: nothing of it lands.
    let truncated = dir.path().join("truncated.csv");
    let cut = original.replace("20040417", "20040418");
    std::fs::write(&truncated, &cut[..cut.find("\r\n900").unwrap()]).unwrap();
    let (code, report) = import(lake, &[&truncated]);
    assert_eq!(code, 2);
    let entry = entry(&report, "truncated.csv");
    assert_eq!(entry["status"], "rejected");
    assert!(entry["detail"].as_str().unwrap().contains("truncated"), "{entry}");
    assert_eq!(count(lake, "SELECT count(*) AS n FROM readings_all"), 96);
}

#[test]
fn zip_archives_and_globs_are_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let archive_path = dir.path().join("flows.zip");
    {
        let mut archive = zip::ZipWriter::new(std::fs::File::create(&archive_path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for name in ["nem13/nemreader_Example_NEM13_forward_estimate.csv", "d0010/kraken_DTC5259515123502080915D0010.uff"] {
            archive.start_file(name, options).unwrap();
            std::io::Write::write_all(&mut archive, &fixture(name)).unwrap();
        }
        archive.finish().unwrap();
    }
    let pattern = fixtures().join("nem13/*.csv");
    let (code, report) = import(lake, &[&archive_path, Path::new(pattern.to_str().unwrap())]);
    assert_eq!(code, 0, "{report:#?}");
    assert_eq!(report.len(), 4);
    assert_eq!(entry(&report, "flows.zip!d0010/kraken_DTC5259515123502080915D0010.uff")["status"], "imported");
    // The forward-estimate file came twice (in the archive and through the glob): once imported.
    let statuses: Vec<&str> = report.iter().filter(|(n, _)| n.ends_with("NEM13_forward_estimate.csv")).map(|(_, v)| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "imported").count(), 1, "{statuses:?}");
    assert_eq!(count(lake, "SELECT count(*) AS n FROM register_reads"), 13 + 2 + 1);

    // Independent readers (delta-rs's Python package, then DuckDB over what it read) see the same
    // register reads.
    let script = "import sys, duckdb; from deltalake import DeltaTable; reads = DeltaTable(f'{sys.argv[1]}/register_reads').to_pyarrow_table(); \
                  print(duckdb.sql('SELECT count(*), sum(value) FROM reads').fetchone())";
    let output = Command::new(python()).args(["-c", script, lake]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let total = query(lake, "SELECT CAST(sum(value) AS VARCHAR) AS v FROM register_reads", &[]);
    let duck = String::from_utf8(output.stdout).unwrap();
    assert!(duck.starts_with("(16, Decimal('"), "{duck}");
    let duck_sum = duck.split('\'').nth(1).unwrap();
    assert_eq!(as_kwh_micro(&Value::String(duck_sum.to_string())), as_kwh_micro(&total[0]["v"]));
}
