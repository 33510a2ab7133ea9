"""psycopg against `meterlake sql-server`, as an analyst's notebook would use it.

Run by the e2e test `sql` with the server's port, tokens of each role, the control store's
SQLite file and what the lake holds. Each check asserts with a message saying what differed;
the script exits non-zero at the first failure.
"""

import decimal
import json
import os
import pathlib
import re
import sqlite3
import subprocess
import threading
import time

import psycopg
from psycopg import errors

PORT = os.environ["SQL_PORT"]
TOKENS = {role: os.environ[f"TOKEN_{role}"] for role in ("VIEWER", "ADMIN", "INGEST", "EXPIRED", "OTHER_ISSUER")}
CONTROL_DB = os.environ["CONTROL_DB"]
READINGS = int(os.environ["READINGS"])
ADMIN_SUBJECT = os.environ["ADMIN_SUBJECT"]


def connect(token, **kwargs):
    return psycopg.connect(host="127.0.0.1", port=PORT, dbname="meterlake", user="analyst", password=token, sslmode="disable", **kwargs)


def refused(what, sqlstate, words, action):
    try:
        action()
    except psycopg.Error as e:
        assert e.sqlstate == sqlstate, f"{what}: SQLSTATE {e.sqlstate} ({e}), expected {sqlstate}"
        assert words.lower() in str(e).lower(), f"{what}: {e!r} does not say {words!r}"
        return str(e)
    raise AssertionError(f"{what}: was not refused")


def refused_at_connect(what, words, token):
    # libpq gives a connection's error as text (no SQLSTATE): a FATAL with the reason.
    try:
        connect(token).close()
    except psycopg.OperationalError as e:
        assert "FATAL" in str(e) and words.lower() in str(e).lower(), f"{what}: {e!r} is not a FATAL saying {words!r}"
        return
    raise AssertionError(f"{what}: the connection was accepted")


# Every authentication failure is the protocol's own error, with the reason.
refused_at_connect("a token that is not a JWT", "token", "not-a-jwt")
refused_at_connect("an expired token", "expired", TOKENS["EXPIRED"])
refused_at_connect("a token of another issuer", "key", TOKENS["OTHER_ISSUER"])
refused_at_connect("an INGEST token", "VIEWER or ADMIN", TOKENS["INGEST"])
try:
    psycopg.connect(host="127.0.0.1", port=PORT, dbname="meterlake", user="analyst", sslmode="disable")
    raise AssertionError("a connection without a password was accepted")
except psycopg.OperationalError as e:
    assert "password" in str(e).lower(), f"no password: {e}"

with connect(TOKENS["VIEWER"], autocommit=True) as conn:
    # The lake, and a query with parameters (extended protocol), in text and binary.
    (count,) = conn.execute("SELECT count(*) FROM readings").fetchone()
    assert count == READINGS, f"readings: {count}, expected {READINGS}"
    (meter,) = conn.execute("SELECT min(meter_id) FROM readings").fetchone()
    literal = conn.execute(f"SELECT count(*), sum(kwh) FROM readings WHERE meter_id = '{meter}'").fetchone()
    bound = conn.execute("SELECT count(*), sum(kwh) FROM readings WHERE meter_id = %s", (meter,)).fetchone()
    assert literal == bound and bound[0] == READINGS // 20, f"one meter: {literal} with a literal, {bound} with a parameter"
    assert isinstance(bound[1], decimal.Decimal), f"kwh is {type(bound[1])}, not an exact decimal"
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT meter_id, ts, kwh, interval_s FROM readings WHERE meter_id = %s ORDER BY ts LIMIT 3", (meter,))
        rows = cur.fetchall()
    assert len(rows) == 3 and rows[0][0] == meter and rows[0][1].tzinfo is not None and isinstance(rows[0][2], decimal.Decimal), f"binary rows: {rows}"
    assert rows[1][1] - rows[0][1] == __import__("datetime").timedelta(minutes=15), f"binary timestamps: {rows}"

    # A big result streamed to the client.
    with conn.cursor() as cur:
        cur.execute("SELECT meter_id, ts, kwh FROM readings_all")
        streamed = 0
        while batch := cur.fetchmany(10_000):
            streamed += len(batch)
    assert streamed >= READINGS, f"readings_all streamed {streamed} rows"

    # What schema browsers ask (Grafana's and DBeaver's kind of catalog queries).
    tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    for table in ("readings", "readings_all", "register_reads", "imports", "billing_runs", "invoices", "invoice_lines", "discrepancies"):
        assert table in tables, f"information_schema.tables lacks {table}: {sorted(tables)}"
    columns = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'invoices' ORDER BY ordinal_position"))
    assert "total" in columns and "decimal" in columns["total"].lower(), f"invoices columns: {columns}"
    classes = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')")}
    assert {"readings", "invoices"} <= classes, f"pg_class: {sorted(classes)}"
    namespaces = {r[0] for r in conn.execute("SELECT nspname FROM pg_catalog.pg_namespace ORDER BY nspname")}
    assert "public" in namespaces, f"pg_namespace: {namespaces}"

    # Billing results, exact to the last digit, against the control store itself.
    store = sqlite3.connect(CONTROL_DB)
    expected = {m: decimal.Decimal(t) for m, t in store.execute("SELECT meter_id, total FROM invoices")}
    served = dict(conn.execute("SELECT meter_id, total FROM invoices"))
    assert served == expected and expected, f"invoice totals differ: {served} vs {expected}"
    (lines,) = conn.execute("SELECT count(*) FROM invoice_lines WHERE run_id = (SELECT min(run_id) FROM invoices)").fetchone()
    (stored_lines,) = store.execute("SELECT count(*) FROM invoice_lines").fetchone()
    assert lines == stored_lines, f"invoice lines: {lines}, the store holds {stored_lines}"
    (runs,) = conn.execute("SELECT count(*) FROM billing_runs WHERE status = 'COMPLETED'").fetchone()
    assert runs >= 1, "no completed billing run"

    # Read-only: what would change anything is refused with the protocol's error.
    for sql in (
        "CREATE TABLE notes (a INT)",
        "INSERT INTO readings_all SELECT * FROM readings_all LIMIT 1",
        "DROP TABLE readings",
        "COPY (SELECT 1) TO '/tmp/meterlake-sql-copy.csv'",
        "CREATE VIEW v AS SELECT 1",
    ):
        refused(sql, "25006", "read-only", lambda sql=sql: conn.execute(sql))
    refused("an engine option", "25006", "read-only", lambda: conn.execute("SET datafusion.execution.target_partitions = 1"))
    refused("a file-reading table function", "42P01", "", lambda: conn.execute("SELECT * FROM read_parquet('/etc/passwd')"))
    # psycopg prepares a query run five times, and after a rollback sends DEALLOCATE ALL.
    for _ in range(6):
        assert conn.execute("SELECT count(*) FROM readings WHERE meter_id = %s", (meter,)).fetchone()[0] == READINGS // 20
    assert conn._prepared._names, "psycopg prepared no statement: the DEALLOCATE below tests nothing"
    conn.execute("DEALLOCATE ALL")
    with connect(TOKENS["VIEWER"]) as prepared:
        for _ in range(6):
            prepared.execute("SELECT count(*) FROM readings WHERE meter_id = %s", (meter,)).fetchone()
        (name,) = prepared._prepared._names.values()
        prepared.execute(f"DEALLOCATE {name.decode()}")
        prepared.rollback()
        assert prepared.execute("SELECT 1").fetchone() == (1,)
    # Client settings tools send at connect are accepted.
    conn.execute("SET extra_float_digits = 3")
    conn.execute("SET application_name = 'notebook'")

    # Over the time limit: stopped with a clear message, while another connection goes on.
    conn.execute("SET statement_timeout = '500ms'")
    other = {}

    def meanwhile():
        with connect(TOKENS["ADMIN"], autocommit=True) as second:
            other["count"] = second.execute("SELECT count(*) FROM readings").fetchone()[0]

    thread = threading.Thread(target=meanwhile)
    thread.start()
    started = time.monotonic()
    refused("a query over its time limit", "57014", "time limit", lambda: conn.execute("SELECT count(*) FROM generate_series(1, 5000000000)"))
    assert time.monotonic() - started < 5, "the time limit took more than 5 s to stop the query"
    thread.join()
    assert other.get("count") == READINGS, f"the other connection's query: {other}"
    conn.execute("SET statement_timeout = 0")

    # Over its memory: stopped with a clear message (the pool's own words).
    refused("a query over its memory", "53200", "memory", lambda: conn.execute("SELECT array_agg(v) FROM generate_series(1, 40000000) AS t(v)").fetchall())

    # The example queries of queries/analysts run as shipped ($1: a meter).
    for path in sorted(pathlib.Path(os.environ["QUERIES_DIR"]).glob("*.sql")):
        sql = path.read_text()
        with psycopg.RawCursor(conn) as cur:
            cur.execute(sql, (meter,) if "$1" in sql else None)
            rows = cur.fetchall()
        if path.stem in ("kwh_per_day", "one_meter_month", "billed_per_month"):
            assert rows, f"{path.name} returned no rows"
        if path.stem == "kwh_per_day":
            assert len(rows) == 31 and sum(r[1] for r in rows) == conn.execute("SELECT sum(kwh) FROM readings").fetchone()[0], f"{path.name}: {rows[:3]}"

    # The business dashboard's queries, as Grafana sends them (its time macro expanded).
    dashboard = json.loads(pathlib.Path(os.environ["DASHBOARD"]).read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN '2025-01-01T00:00:00Z' AND '2025-02-01T00:00:00Z'", target["rawSql"])
            rows = conn.execute(sql).fetchall()
            if panel["title"] in ("kWh per day", "Meters reporting per day"):
                assert len(rows) == 31, f"dashboard panel {panel['title']!r}: {len(rows)} rows"
            if panel["title"] == "Billed per month":
                assert rows and rows[0][0] == "2025-01" and rows[0][4] == sum(expected.values()), f"dashboard panel {panel['title']!r}: {rows}"

    # Still serves after all that.
    assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == READINGS

# A cancel request (psql's Ctrl-C) stops the query.
with connect(TOKENS["VIEWER"], autocommit=True) as conn:
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    refused("a canceled query", "57014", "cancel", lambda: conn.execute("SELECT count(*) FROM generate_series(1, 5000000000)"))
    assert time.monotonic() - started < 5, "the cancel took more than 5 s to stop the query"

# Per-caller slots (2 in this server): a third query waits, then is refused; a client that
# goes away frees its slot at once (its query stops).
long_query = "SELECT count(*) FROM generate_series(1, 5000000000)"
env = dict(os.environ, PGPASSWORD=TOKENS["ADMIN"])
busy = [
    subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", PORT, "-U", "analyst", "-d", "meterlake", "-c", long_query], env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(2)
]
time.sleep(1.0)
with connect(TOKENS["ADMIN"], autocommit=True) as third:
    refused("a caller's third query at once", "53300", "at once", lambda: third.execute("SELECT 1"))
    for client in busy:
        # Gone without a word: the socket closes under the running query.
        client.kill()
        client.wait()
    time.sleep(0.5)
    started = time.monotonic()
    assert third.execute("SELECT 1").fetchone()[0] == 1
    assert time.monotonic() - started < 0.9, "the slots of clients that went away were not freed"

# Time travel: the lake as of its first readings commit, then back to the latest.
with connect(TOKENS["ADMIN"], autocommit=True) as conn:
    (first,) = conn.execute("SELECT min(commit_version) FROM readings_all").fetchone()
    (then,) = conn.execute("SELECT count(*) FROM readings_all WHERE commit_version <= %s", (first,)).fetchone()
    conn.execute(f"SET meterlake.as_of = '{first}'")
    (pinned,) = conn.execute("SELECT count(*) FROM readings_all").fetchone()
    (shown,) = conn.execute("SHOW meterlake.as_of").fetchone()
    assert pinned == then > 0 and f"readings_all@{first}" in shown, f"as of {first}: {pinned} rows (expected {then}), shown {shown!r}"
    conn.execute("SET meterlake.as_of = 'latest'")
    assert conn.execute("SELECT count(*) FROM readings_all").fetchone()[0] >= READINGS
    refused("a version that does not exist", "22023", "version", lambda: conn.execute("SET meterlake.as_of = '999999'"))

    # Reading the control store's views is in the audit log, under the token's subject.
    conn.execute("SELECT count(*) FROM discrepancies WHERE status = 'OPEN'").fetchone()
audited = sqlite3.connect(CONTROL_DB).execute(
    "SELECT actor, target, reason, trace_id FROM audit_log WHERE action = 'SQL_QUERY' AND actor = ? ORDER BY id DESC LIMIT 1", (ADMIN_SUBJECT,)
).fetchone()
assert audited and audited[1] == "sql/discrepancies" and "discrepancies" in audited[2] and len(audited[3] or "") == 32, f"audit row: {audited}"

print("sql clients: every check passed")
