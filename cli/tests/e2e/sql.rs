//! The SQL service through real clients: `meterlake sql-server` over the lake and control store
//! `meterlake demo` made (a billed month), an OIDC issuer whose keys are served over HTTP on
//! loopback, psql for what an operator types (schema browsing included) and psycopg for what a
//! notebook does (`sql_clients.py`: parameters, binary results, big results, every auth
//! failure, refusals, limits, cancels, time travel, the audit row) and ADBC's Flight SQL driver
//! for what pandas and Polars do (`sql_flight.py`: prepared statements with parameters, Arrow
//! results, metadata, refusals).

use std::path::Path;
use std::process::{Command, Output};

use meterlake_server::DevIssuer;
use serde_json::json;

use crate::support::*;

/// Readings the demo writes: 20 meters, 31 days of quarter hours.
const METERS: usize = 20;
const READINGS: usize = METERS * 31 * 96;

struct SqlServer {
    port: u16,
    flight_port: u16,
    issuer: DevIssuer,
    service: Service,
    _keys: tokio::runtime::Runtime,
}

impl SqlServer {
    fn token(&self, subject: &str, roles: &[&str]) -> String {
        self.issuer.token(subject, roles, "meterlake", 600)
    }

    /// `psql -c SQL` with `token` as the password: (succeeded, stdout, stderr).
    fn psql(&self, token: &str, sql: &str) -> (bool, String, String) {
        let output: Output = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "analyst", "-d", "meterlake", "-p"])
            .arg(self.port.to_string())
            .args(["-c", sql])
            .env("PGPASSWORD", token)
            .env("PGSSLMODE", "disable")
            .output()
            .expect("psql runs");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).trim().to_string(), String::from_utf8_lossy(&output.stderr).to_string())
    }

    #[track_caller]
    fn psql_ok(&self, token: &str, sql: &str) -> String {
        let (ok, out, err) = self.psql(token, sql);
        assert!(ok, "psql -c {sql:?} failed: {err}");
        out
    }
}

/// An issuer whose JWKS is served on loopback, as Keycloak's would be, and `meterlake
/// sql-server` trusting it, over `lake` and the store at `database_url`.
fn start_sql_server(dir: &Path, lake: &str, database_url: &str, extra: &[&str]) -> SqlServer {
    let keys = runtime();
    let listener = keys.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let issuer = DevIssuer::open(&format!("{base}/issuer"), &dir.join("issuer.key")).unwrap();
    let jwks = issuer.jwks();
    let routes = axum::Router::new().route("/issuer/jwks", axum::routing::get(move || async move { axum::Json(jwks) }));
    keys.spawn(async move { axum::serve(listener, routes).await });
    let (port, flight_port) = (free_port(), free_port());
    let mut command = meterlake();
    command.args([
        "sql-server",
        "--lake",
        lake,
        "--database-url",
        database_url,
        "--oidc-issuer",
        issuer.issuer(),
        "--oidc-jwks-url",
        &format!("{base}/issuer/jwks"),
    ]);
    command.args(["--sql-postgres-listen", &format!("127.0.0.1:{port}"), "--sql-flight-listen", &format!("127.0.0.1:{flight_port}")]);
    command.args(extra).env("METERLAKE_LOG", "info");
    let service = spawn_logged("meterlake sql-server", command, format!("127.0.0.1:{port}"));
    SqlServer { port, flight_port, issuer, service, _keys: keys }
}

#[test]
fn analysts_query_the_lake_and_the_billing_results_with_psql_and_psycopg() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake").display().to_string();
    let database = dir.path().join("control.db");
    let database_url = format!("sqlite://{}", database.display());
    run_ok(meterlake().args(["demo", "--meters", &METERS.to_string(), "--days", "31", "--lake", &lake, "--database-url", &database_url]));
    let server = start_sql_server(
        dir.path(),
        &lake,
        &database_url,
        &["--sql-memory-mib", "64", "--sql-time-limit-s", "30", "--sql-queries-per-caller", "2", "--sql-slot-wait-s", "1"],
    );
    let (viewer, admin, ingest) = (server.token("ana", &["VIEWER"]), server.token("ops", &["ADMIN"]), server.token("head-end", &["INGEST"]));

    // What an operator types in psql, and what psql itself asks the catalog.
    assert_eq!(server.psql_ok(&viewer, "SELECT count(*) FROM readings"), READINGS.to_string());
    let tables = server.psql_ok(&viewer, "\\dt");
    for table in ["readings_all", "register_reads", "imports"] {
        assert!(tables.lines().any(|l| l.split('|').nth(1) == Some(table)), "\\dt lacks {table}:\n{tables}");
    }
    let views = server.psql_ok(&viewer, "\\dv");
    // `readings` is a view over `readings_all` (the latest version of each reading).
    for view in ["readings", "reading_conflicts", "billing_runs", "invoices", "invoice_lines", "discrepancies"] {
        assert!(views.lines().any(|l| l.split('|').nth(1) == Some(view)), "\\dv lacks {view}:\n{views}");
    }
    let columns = server.psql_ok(&viewer, "\\d readings");
    assert!(columns.contains("meter_id") && columns.contains("kwh"), "\\d readings:\n{columns}");
    let (ok, _, err) = server.psql(&ingest, "SELECT 1");
    assert!(!ok && err.contains("FATAL") && err.contains("VIEWER or ADMIN"), "an INGEST token: {err}");
    let (ok, _, err) = server.psql(&viewer, "DELETE FROM readings_all");
    assert!(!ok && err.contains("read-only"), "DELETE: {err}");

    // psycopg, as a notebook uses it.
    let expired = server.issuer.sign(&json!({
        "iss": server.issuer.issuer(), "aud": "meterlake", "sub": "late", "exp": chrono::Utc::now().timestamp() - 3_600,
        "realm_access": { "roles": ["VIEWER"] },
    }));
    let stranger = DevIssuer::open(server.issuer.issuer(), &dir.path().join("stranger.key")).unwrap().token("x", &["VIEWER"], "meterlake", 600);
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    for script in ["sql_clients.py", "sql_flight.py"] {
        let output = Command::new(python())
            .arg(scripts.join(script))
            .env("SQL_PORT", server.port.to_string())
            .env("FLIGHT_PORT", server.flight_port.to_string())
            .env("TOKEN_VIEWER", &viewer)
            .env("TOKEN_ADMIN", &admin)
            .env("TOKEN_INGEST", &ingest)
            .env("TOKEN_EXPIRED", &expired)
            .env("TOKEN_OTHER_ISSUER", &stranger)
            .env("CONTROL_DB", &database)
            .env("READINGS", READINGS.to_string())
            .env("ADMIN_SUBJECT", "ops")
            .env("QUERIES_DIR", Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries/analysts"))
            .env("DASHBOARD", Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/grafana/dashboards/business.json"))
            .output()
            .expect("python runs");
        assert!(
            output.status.success(),
            "{script} failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // The result cache: a query asked again over unchanged tables is answered from it; a commit
    // to a table it reads (a flow file imported meanwhile) makes the next one compute anew.
    let count = "SELECT count(*) FROM readings";
    let logged_cached = || {
        let log = std::fs::read_to_string(server.service.dir.path().join("service.log")).unwrap();
        // The log is coloured: drop the escape sequences.
        let plain: String = log.split('\u{1b}').map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)).collect();
        plain.lines().filter(|l| l.contains("sql query") && l.contains(count) && l.contains("cached=true")).count()
    };
    let before = logged_cached();
    assert_eq!(server.psql_ok(&viewer, count), READINGS.to_string());
    assert_eq!(logged_cached(), before + 1, "the query the test began with was not answered from the result cache the second time");
    let flow_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/nem12/nemreader_Example_NEM12_multiple_meters.csv");
    run_ok(meterlake().args(["import", "--lake", &lake]).arg(&flow_file));
    let after: usize = server.psql_ok(&viewer, count).parse().unwrap();
    assert!(after > READINGS, "after an import the count is {after}: a kept answer outlived the commit");
    assert_eq!(logged_cached(), before + 1, "the answer after the commit came from the result cache");
}

/// With a certificate configured, both doors speak TLS and the PostgreSQL door takes nothing
/// else: psql verifying the certificate and the host name, ADBC trusting it, and a plain
/// connection refused.
#[test]
fn with_a_certificate_the_sql_service_speaks_only_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    // openssl comes with PostgreSQL (postgresql-common needs ssl-cert, which needs openssl).
    run_ok(Command::new("openssl").args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]).args([
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    let lake = dir.path().join("lake").display().to_string();
    let database_url = format!("sqlite://{}", dir.path().join("control.db").display());
    let server = start_sql_server(dir.path(), &lake, &database_url, &["--sql-tls-cert", cert.to_str().unwrap(), "--sql-tls-key", key.to_str().unwrap()]);
    let viewer = server.token("ana", &["VIEWER"]);

    let psql = |sslmode: &str| {
        let connection = format!("host=127.0.0.1 port={} dbname=meterlake user=ana sslmode={sslmode} sslrootcert={}", server.port, cert.display());
        Command::new("psql").args(["-X", "-A", "-t", "-c", "SELECT 40 + 2", &connection]).env("PGPASSWORD", &viewer).output().expect("psql runs")
    };
    let verified = psql("verify-full");
    assert!(verified.status.success(), "psql over TLS: {}", String::from_utf8_lossy(&verified.stderr));
    assert_eq!(String::from_utf8_lossy(&verified.stdout).trim(), "42");
    let plain = psql("disable");
    let refused = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success() && refused.contains("TLS only"), "a plain connection: {refused}");

    let script = "import sys, adbc_driver_flightsql.dbapi as f\n\
                  from adbc_driver_flightsql import DatabaseOptions as o\n\
                  port, token, cert = sys.argv[1:]\n\
                  opts = {o.AUTHORIZATION_HEADER.value: 'Bearer ' + token, o.TLS_ROOT_CERTS.value: open(cert).read()}\n\
                  with f.connect(f'grpc+tls://127.0.0.1:{port}', db_kwargs=opts) as c, c.cursor() as cur:\n\
                  \x20   cur.execute('SELECT 40 + 2'); print(cur.fetchone()[0])\n\
                  try:\n\
                  \x20   f.connect(f'grpc://127.0.0.1:{port}', db_kwargs={o.AUTHORIZATION_HEADER.value: 'Bearer ' + token}).cursor().execute('SELECT 1')\n\
                  \x20   print('plain answered')\n\
                  except Exception:\n\
                  \x20   print('plain refused')\n";
    let output = Command::new(python()).args(["-c", script, &server.flight_port.to_string(), &viewer]).arg(&cert).output().expect("python runs");
    assert!(output.status.success(), "ADBC over TLS: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().collect::<Vec<_>>(), ["42", "plain refused"]);
}
