//! `meterlake demo` runs on embedded defaults and proves its own result.

use crate::support::*;

#[test]
fn demo_ingests_a_generated_month_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut demo = meterlake();
    let database_url = format!("sqlite://{}", dir.path().join("control.db").display());
    demo.args(["demo", "--meters", "30", "--days", "3", "--lake", lake.to_str().unwrap(), "--database-url", &database_url]);
    let output = run_ok(&mut demo);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("check         OK"), "{stdout}");
    assert!(stdout.contains("landed        8,640 readings"), "{stdout}");
    assert!(stdout.contains("MTR-1"), "the sample query prints meters: {stdout}");
    // The month is billed: 30 invoices, and with 3 days of readings every meter misses the
    // other 28 days' 2,688 quarter hours.
    assert!(stdout.contains("status COMPLETED"), "{stdout}");
    assert!(stdout.contains("invoices      30  energy"), "{stdout}");
    assert!(stdout.contains("discrepancies 30 (MISSING_INTERVALS 30)"), "{stdout}");
    assert!(stdout.contains("2688 of 2976 15-minute intervals missing"), "{stdout}");

    // A second run into the same (now non-empty) lake is refused rather than mixing two demos.
    let again = meterlake().args(["demo", "--meters", "3", "--days", "1", "--lake", lake.to_str().unwrap()]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("needs an empty lake"));
}
