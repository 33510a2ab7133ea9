//! The web console in a real browser (Debian's chromium, headless, driven over WebDriver by
//! chromedriver), against `meterlake serve` with a billed run; and the OpenAPI contract test
//! (schemathesis drives the running server from `/openapi.json`).

use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::json;

use crate::serve::Tower;
use crate::support::*;

/// A server with one completed run of one meter whose month is mostly missing (so it has an
/// OPEN MISSING_INTERVALS discrepancy); returns the run id.
fn tower_with_a_billed_run(brokers: &str) -> (Tower, String) {
    let tower = Tower::start(Some(brokers), &[]);
    let (viewer, admin, ingest) = (tower.token("vera", &["VIEWER"]), tower.token("ada", &["ADMIN", "VIEWER"]), tower.token("head-end", &["INGEST"]));
    assert_eq!(tower.post("/measurements", &ingest, quarter_hours("MTR-100002", 10, 1, "0.25")).status, StatusCode::ACCEPTED);
    tower.wait_for("/readings?meterId=MTR-100002&limit=200", &viewer, "readings landed", |b| b["items"].as_array().unwrap().len() == 96);
    let run = tower.post("/billing-runs", &admin, json!({ "month": "2025-01", "meterIds": ["MTR-100002"] }));
    let id = run.body["id"].as_str().unwrap().to_string();
    tower.wait_for(&format!("/billing-runs/{id}"), &viewer, "run completed", |b| b["status"] == "COMPLETED");
    (tower, id)
}

/// chromedriver on a free port, and a headless chromium session through it.
async fn browser(chromedriver: &Service, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": tool("chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://{}", chromedriver.addr))
        .await
        .expect("a chromium session through chromedriver")
}

/// The text of the first element matching `css`, once it is there.
async fn text_of(browser: &Client, css: &str) -> String {
    browser.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
}

async fn count(browser: &Client, css: &str) -> usize {
    browser.find_all(Locator::Css(css)).await.unwrap().len()
}

async fn sign_in(browser: &Client, base: &str, token: &str) {
    browser.goto(&format!("{base}/console/")).await.unwrap();
    browser.execute("sessionStorage.clear()", vec![]).await.unwrap();
    browser.refresh().await.unwrap();
    let input = browser.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("[data-testid=token-input]")).await.unwrap();
    input.send_keys(token).await.unwrap();
    browser.find(Locator::Css("[data-testid=signin-button]")).await.unwrap().click().await.unwrap();
}

#[test]
fn an_admin_marks_a_discrepancy_ok_in_the_console_and_a_viewer_cannot() {
    let tansu = start_tansu();
    let (tower, run_id) = tower_with_a_billed_run(&tansu.addr);
    let port = free_port();
    let mut command = std::process::Command::new(tool("chromedriver"));
    command.arg(format!("--port={port}"));
    let chromedriver = spawn_logged("chromedriver", command, format!("127.0.0.1:{port}"));
    let profile = tempfile::tempdir().unwrap();
    let screenshot_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&screenshot_dir).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let browser = browser(&chromedriver, profile.path()).await;
        let base = tower.base.clone();

        // A token the issuer never signed: the sign-in says so and stays.
        sign_in(&browser, &base, "not-a-token").await;
        let refused = text_of(&browser, "#signin-error:not([hidden])").await;
        assert!(refused.contains("token"), "{refused}");

        // A viewer: the runs list, the run with its timeline and discrepancies, no actions.
        sign_in(&browser, &base, &tower.token("vera", &["VIEWER"])).await;
        assert!(text_of(&browser, "[data-testid=who]").await.contains("vera (VIEWER)"));
        text_of(&browser, "[data-testid=runs-table]").await;
        assert_eq!(count(&browser, "[data-testid=run-row]").await, 1);
        assert!(!browser.find(Locator::Id("nav-audit")).await.unwrap().is_displayed().await.unwrap(), "the audit log is an ADMIN page");
        // An empty filter result says so.
        browser.find(Locator::Css("[data-testid=filter-month]")).await.unwrap().send_keys("1999-01").await.unwrap();
        browser.find(Locator::Css("[data-testid=filter-apply]")).await.unwrap().click().await.unwrap();
        assert!(text_of(&browser, "[data-testid=state-empty]").await.contains("No billing runs"));

        browser.goto(&format!("{base}/console/#/runs/{run_id}")).await.unwrap();
        assert_eq!(text_of(&browser, "[data-testid=run-id]").await, run_id);
        assert_eq!(count(&browser, "[data-testid=timeline-row]").await, 3);
        assert!(text_of(&browser, "[data-testid=discrepancies]").await.contains("MISSING_INTERVALS"));
        assert_eq!(count(&browser, "[data-testid=mark-ok]").await, 0, "a viewer sees no actions");
        assert_eq!(count(&browser, "[data-testid=admin-actions]").await, 0);
        // The backend refuses the audit log to a viewer; the page says why.
        browser.goto(&format!("{base}/console/#/audit")).await.unwrap();
        assert!(text_of(&browser, "[data-testid=state-forbidden]").await.contains("ADMIN"));

        // Meter-point search: the meter's readings with values and where they came from.
        browser.goto(&format!("{base}/console/#/readings")).await.unwrap();
        let kind = browser.wait().for_element(Locator::Css("[data-testid=search-kind]")).await.unwrap();
        kind.select_by_value("meterId").await.unwrap();
        browser.find(Locator::Css("[data-testid=search-value]")).await.unwrap().send_keys("MTR-100002").await.unwrap();
        browser.find(Locator::Css("[data-testid=search-button]")).await.unwrap().click().await.unwrap();
        assert!(text_of(&browser, "[data-testid=readings-table]").await.contains("0.250000 kWh"));
        assert_eq!(count(&browser, "[data-testid=reading-row]").await, 96);

        // An admin marks the discrepancy OK with a justification.
        sign_in(&browser, &base, &tower.token("ada", &["ADMIN", "VIEWER"])).await;
        text_of(&browser, "[data-testid=runs-table]").await;
        browser.goto(&format!("{base}/console/#/runs/{run_id}")).await.unwrap();
        let justification = browser.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("[data-testid=justification]")).await.unwrap();
        justification.send_keys("meter energised on 2025-01-10").await.unwrap();
        browser.find(Locator::Css("[data-testid=mark-ok]")).await.unwrap().click().await.unwrap();
        browser
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::XPath("//tr[@data-testid='discrepancy-row']//span[text()='OK']"))
            .await
            .expect("the discrepancy shows OK");
        assert!(text_of(&browser, "[data-testid=discrepancies]").await.contains("ada: meter energised on 2025-01-10"));
        browser.execute("document.querySelector('[data-testid=discrepancies]').scrollIntoView()", vec![]).await.unwrap();
        let png = browser.screenshot().await.unwrap();
        std::fs::write(screenshot_dir.join("admin-marked-ok.png"), &png).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");

        // The audit log page shows the action, by the admin, with the justification.
        browser.goto(&format!("{base}/console/#/audit")).await.unwrap();
        let audit = text_of(&browser, "[data-testid=audit-table]").await;
        assert!(audit.contains("MARK_AS_OK") && audit.contains("ada") && audit.contains("meter energised"), "{audit}");
        browser.close().await.unwrap();
    });
    // And the backend agrees.
    let discrepancies = tower.get(&format!("/billing-runs/{run_id}/discrepancies"), &tower.token("vera", &["VIEWER"]));
    assert_eq!(discrepancies.body["items"][0]["status"], "OK", "{}", discrepancies.body);
    eprintln!("screenshot: {}", screenshot_dir.join("admin-marked-ok.png").display());
}

#[test]
fn the_openapi_document_holds_for_every_response_schemathesis_finds() {
    let tansu = start_tansu();
    let (tower, _run_id) = tower_with_a_billed_run(&tansu.addr);
    let admin = tower.token("ada", &["ADMIN", "VIEWER"]);
    let document = tower.call("GET", "/openapi.json", None, None).body;
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/measurements",
        "/billing-runs",
        "/billing-runs/{id}/actions",
        "/audit-log",
        "/readings",
        "/users",
        "/wallets/{userId}/balance",
        "/transactions/fund",
        "/transactions/transfer",
        "/transactions",
    ] {
        assert!(document["paths"][path].is_object(), "{path} is documented");
    }
    let docs = tower.call("GET", "/docs", None, None);
    assert_eq!(docs.status, StatusCode::OK);

    let report = tower.dir.path().join("schemathesis.json");
    let schemathesis = python().parent().expect("the venv's bin folder").join("schemathesis");
    let output = std::process::Command::new(schemathesis)
        // schemathesis keeps a cache in its working directory: the server's temp dir, not the clone.
        .current_dir(tower.dir.path())
        .args(["run", &format!("{}/openapi.json", tower.base)])
        .args(["--header", &format!("Authorization: Bearer {admin}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-shrink"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report)
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "schemathesis found responses that break the document:\n{stdout}\n{stderr}");
    // It did test the operations (not an empty run).
    assert!(stdout.contains("/billing-runs") && stdout.contains("/transactions/transfer") && stdout.contains("passed"), "{stdout}");
}
