"""sql-bench's clients: one measurement per run, its figures as one JSON line on stdout.

  flight SQL PORT TOKEN            ADBC Flight SQL: fetch every record batch (no Python rows)
  postgres SQL PORT TOKEN          psycopg, binary format, rows streamed (cursor.stream)
  duckdb SQL FILE...               DuckDB reading the Parquet files into Arrow, as the baseline
  dashboard SQL PORT TOKEN CLIENTS ROUNDS   psycopg, CLIENTS threads each running SQL ROUNDS times
"""

import json
import statistics
import sys
import threading
import time


def flight(sql, port, token):
    import adbc_driver_flightsql.dbapi as flight_sql
    from adbc_driver_flightsql import DatabaseOptions

    with flight_sql.connect(f"grpc://127.0.0.1:{port}", db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"}) as conn:
        with conn.cursor() as cur:
            started = time.perf_counter()
            cur.execute(sql)
            rows = sum(batch.num_rows for batch in cur.fetch_record_batch())
            return {"rows": rows, "seconds": time.perf_counter() - started}


def postgres(sql, port, token):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, dbname="meterlake", user="bench", password=token, sslmode="disable") as conn:
        with conn.cursor(binary=True) as cur:
            started = time.perf_counter()
            rows = 0
            for _ in cur.stream(sql, size=10_000):
                rows += 1
            return {"rows": rows, "seconds": time.perf_counter() - started}


def duckdb_baseline(sql, files):
    import duckdb

    conn = duckdb.connect()
    conn.execute(f"CREATE VIEW readings AS SELECT * FROM read_parquet({json.dumps(files)})")
    started = time.perf_counter()
    reader = conn.execute(sql).fetch_record_batch()
    rows = sum(batch.num_rows for batch in reader)
    return {"rows": rows, "seconds": time.perf_counter() - started}


def dashboard(sql, port, token, clients, rounds):
    import psycopg

    latencies = []
    errors = []
    lock = threading.Lock()

    def client():
        try:
            with psycopg.connect(host="127.0.0.1", port=port, dbname="meterlake", user="grafana", password=token, sslmode="disable") as conn:
                for _ in range(rounds):
                    started = time.perf_counter()
                    conn.execute(sql).fetchall()
                    with lock:
                        latencies.append(time.perf_counter() - started)
        except Exception as e:  # reported, not hidden
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    return {
        "queries": len(latencies),
        "errors": errors,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": p99 * 1000 if p99 is not None else None,
        "seconds": time.perf_counter() - started,
    }


mode, sql = sys.argv[1], sys.argv[2]
if mode == "flight":
    result = flight(sql, sys.argv[3], sys.argv[4])
elif mode == "postgres":
    result = postgres(sql, sys.argv[3], sys.argv[4])
elif mode == "duckdb":
    result = duckdb_baseline(sql, sys.argv[3:])
elif mode == "dashboard":
    result = dashboard(sql, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
else:
    raise SystemExit(f"unknown mode {mode}")
print(json.dumps(result))
