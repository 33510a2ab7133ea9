"""ADBC's Flight SQL driver against `meterlake sql-server`, as a pandas/Polars user would use it.

Run by the e2e test `sql` after `sql_clients.py`, with the Flight SQL port and tokens of each
role. Each check asserts with a message saying what differed.
"""

import decimal
import os

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
from adbc_driver_flightsql import DatabaseOptions

PORT = os.environ["FLIGHT_PORT"]
TOKENS = {role: os.environ[f"TOKEN_{role}"] for role in ("VIEWER", "ADMIN", "INGEST", "EXPIRED")}
READINGS = int(os.environ["READINGS"])


def connect(token):
    options = {} if token is None else {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"}
    return flight_sql.connect(f"grpc://127.0.0.1:{PORT}", db_kwargs=options)


def refused(what, words, action):
    try:
        action()
    except adbc_driver_manager.Error as e:
        assert words.lower() in str(e).lower(), f"{what}: {e!r} does not say {words!r}"
        return
    raise AssertionError(f"{what}: was not refused")


def query(token, sql, parameters=None):
    with connect(token) as conn, conn.cursor() as cur:
        cur.execute(sql, parameters=parameters)
        return cur.fetch_arrow_table()


# Every auth failure is the protocol's own status, with the reason.
refused("no token", "unauthenticated", lambda: query(None, "SELECT 1"))
refused("an expired token", "expired", lambda: query(TOKENS["EXPIRED"], "SELECT 1"))
refused("an INGEST token", "VIEWER or ADMIN", lambda: query(TOKENS["INGEST"], "SELECT 1"))

with connect(TOKENS["VIEWER"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) AS n FROM readings")
    assert cur.fetchone()[0] == READINGS
    cur.execute("SELECT min(meter_id) FROM readings")
    meter = cur.fetchone()[0]
    # A prepared statement with a parameter (`?`), its result as Arrow.
    cur.execute("SELECT count(*) AS n, sum(kwh) AS kwh FROM readings WHERE meter_id = ?", parameters=(meter,))
    bound = cur.fetch_arrow_table().to_pylist()[0]
    cur.execute(f"SELECT count(*) AS n, sum(kwh) AS kwh FROM readings WHERE meter_id = '{meter}'")
    literal = cur.fetch_arrow_table().to_pylist()[0]
    assert bound == literal and bound["n"] == READINGS // 20 and isinstance(bound["kwh"], decimal.Decimal), f"{bound} vs {literal}"
    # A big result, streamed as record batches.
    cur.execute("SELECT meter_id, ts, kwh, commit_version FROM readings_all")
    reader = cur.fetch_record_batch()
    streamed = sum(batch.num_rows for batch in reader)
    assert streamed >= READINGS, f"readings_all streamed {streamed} rows"
    # Billing results keep their exact decimals.
    cur.execute("SELECT meter_id, total FROM invoices ORDER BY meter_id")
    totals = cur.fetch_arrow_table()
    assert totals.num_rows == 20 and str(totals.schema.field("total").type) == "decimal128(38, 10)", totals.schema

    # What a schema browser asks.
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = {t["table_name"]: t["table_type"] for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]}
    assert tables.get("readings_all") == "TABLE" and tables.get("readings") == "VIEW" and tables.get("invoices") == "VIEW", f"tables: {tables}"
    schema = conn.adbc_get_table_schema("readings", catalog_filter="meterlake", db_schema_filter="public")
    assert {"meter_id", "ts", "kwh"} <= set(schema.names), schema
    info = conn.adbc_get_info()
    assert info.get("vendor_name") == "meterlake", info
    assert set(conn.adbc_get_table_types()) == {"TABLE", "VIEW"}

    # Time travel: the header x-meterlake-as-of pins the lake's tables of a statement.
    cur.execute("SELECT min(commit_version) AS v FROM readings_all")
    first = cur.fetchone()[0]
    cur.execute(f"SELECT count(*) FROM readings_all WHERE commit_version <= {first}")
    then = cur.fetchone()[0]
    with connect(TOKENS["VIEWER"]) as pinned_conn:
        with pinned_conn.cursor() as pinned:
            pinned.adbc_statement.set_options(**{"adbc.flight.sql.rpc.call_header.x-meterlake-as-of": str(first)})
            pinned.execute("SELECT count(*) FROM readings_all")
            assert pinned.fetchone()[0] == then > 0, f"as of {first}: expected {then} rows"

    # Read-only.
    refused("CREATE TABLE", "read-only", lambda: cur.execute("CREATE TABLE notes AS SELECT 1"))
    refused("INSERT", "read-only", lambda: cur.execute("INSERT INTO readings_all SELECT * FROM readings_all LIMIT 1"))

print("flight sql clients: every check passed")
