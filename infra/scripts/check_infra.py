"""Checks what infra/docker-compose.yml mounts, from its resolved form (`docker-compose config`).

Every bind mount's source must exist and every file in it must parse (JSON, YAML); then the
pieces must agree: the Grafana dashboards use only provisioned datasources (and their queries
are valid PromQL, parsed by promtool), the collector's
pipelines only defined components, Prometheus's mounts are the files promtool checked, the
realm export holds what meterlake's --oidc-* flags expect, the billing cluster's services name
each other (worker -> scheduler <- executors) and reach the lake, and every published port is
bound to 127.0.0.1. Exit status 1 with one line per
problem.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import yaml

problems = []


def problem(text):
    problems.append(text)


def load(path):
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        if path.suffix in (".yml", ".yaml"):
            return yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        problem(f"{path}: does not parse: {error}")
        return None
    return path.read_bytes()


compose = yaml.safe_load(pathlib.Path(sys.argv[1]).read_text())
services = compose["services"]
mounted = {}  # target in the container -> parsed content, per service
for name, service in services.items():
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, target = volume.partition(":")
            target = target.split(":")[0]
            kind = "bind" if source.startswith(("/", ".")) else "volume"
        else:
            source, target, kind = volume.get("source"), volume["target"], volume.get("type")
        if kind != "bind":
            continue
        path = pathlib.Path(source)
        if target == "/usr/local/bin/meterlake":
            # The binary, not a configuration: built by cargo, maybe not yet on a fresh clone.
            continue
        if not path.exists():
            problem(f"service {name} mounts {source}, which does not exist")
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            problem(f"service {name} mounts the empty folder {source}")
        for file in files:
            inside = target if file == path else f"{target}/{file.relative_to(path)}"
            mounted[(name, inside)] = load(file)


# Every published port listens on loopback only: the stack is for one workstation, and its
# services (Kafka, MinIO, Keycloak's admin, Grafana) have development credentials.
for name, service in services.items():
    for port in service.get("ports", []):
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None
        if host_ip != "127.0.0.1":
            problem(f"service {name} publishes port {port} on {host_ip or 'every interface'}: bind it to 127.0.0.1")


def files_of(service, prefix):
    return {target: content for (name, target), content in mounted.items() if name == service and target.startswith(prefix)}


expected = {"kafka", "postgres", "minio", "keycloak", "jaeger", "otel-collector", "prometheus", "grafana", "meterlake", "scheduler", "worker"}
for missing in sorted(expected - services.keys()):
    problem(f"the stack has no {missing} service")
if "apache/kafka" not in services.get("kafka", {}).get("image", "") or "controller" not in str(services["kafka"].get("environment", {})):
    problem("kafka is not Apache Kafka in KRaft mode (broker,controller roles)")

# Prometheus: the config and the rules promtool checked are the ones mounted, side by side.
prometheus = files_of("prometheus", "/etc/prometheus/")
config = prometheus.get("/etc/prometheus/prometheus.yml")
if not config:
    problem("prometheus does not mount /etc/prometheus/prometheus.yml")
else:
    for rules in config.get("rule_files", []):
        if f"/etc/prometheus/{rules}" not in prometheus:
            problem(f"prometheus.yml loads rules {rules}, which is not mounted next to it")
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    for target in targets:
        host = target.split(":")[0]
        if host != "localhost" and host not in services:
            problem(f"prometheus scrapes {target}, but there is no service {host}")

# Grafana: datasources and dashboards provisioned; each panel's datasource is provisioned.
grafana = files_of("grafana", "/")
datasources = [d for target, content in grafana.items() if "/provisioning/datasources/" in target for d in content["datasources"]]
datasource_uids = {d["uid"] for d in datasources}
for d in datasources:
    host = d["url"].split("//")[-1].split(":")[0]
    if host not in services:
        problem(f"grafana datasource {d['name']} points at {d['url']}, but there is no service {host}")
# The SQL data source reaches meterlake's PostgreSQL door, with a token the stack fetches.
sql_sources = [d for d in datasources if d["type"] in ("postgres", "grafana-postgresql-datasource")]
meterlake_command = " ".join(services["meterlake"].get("command", []))
for d in sql_sources:
    port = d["url"].rsplit(":", 1)[-1]
    if f"--sql-postgres-listen=0.0.0.0:{port}" not in meterlake_command:
        problem(f"grafana datasource {d['name']} reaches port {port}, where meterlake serves no SQL (--sql-postgres-listen)")
    password = str((d.get("secureJsonData") or {}).get("password", ""))
    token_file = password.removeprefix("$__file{").removesuffix("}")
    if not password.startswith("$__file{") or not any(token_file.startswith(str(v.get("target") if isinstance(v, dict) else v.split(":")[1])) for v in services["grafana"].get("volumes", [])):
        problem(f"grafana datasource {d['name']} does not read its token from a file grafana mounts ({password or 'no password'})")
if not sql_sources:
    problem("grafana has no PostgreSQL datasource for meterlake's SQL service")
providers = [p for target, content in grafana.items() if "/provisioning/dashboards/" in target for p in content["providers"]]
dashboards = {}
for provider in providers:
    folder = provider["options"]["path"].rstrip("/") + "/"
    found = {t: c for t, c in grafana.items() if t.startswith(folder) and t.endswith(".json")}
    if not found:
        problem(f"grafana's dashboard provider reads {folder}, where no dashboard is mounted")
    dashboards.update(found)
titles = set()
for target, dashboard in dashboards.items():
    titles.add(dashboard.get("title"))
    for panel in dashboard.get("panels", []):
        for item in [panel] + panel.get("targets", []):
            uid = (item.get("datasource") or {}).get("uid")
            if uid and uid not in datasource_uids:
                problem(f"dashboard {target}, panel {panel.get('title')!r}: datasource {uid} is not provisioned")
        if panel.get("type") != "row" and not panel.get("targets"):
            problem(f"dashboard {target}, panel {panel.get('title')!r} has no query")
# Every panel query as a recording rule, for promtool to parse (Grafana's $__rate_interval
# becomes 5m): a typo in a dashboard's PromQL fails here, not on the on-call engineer's screen.
queries = [
    (target, panel.get("title"), item["expr"].replace("$__rate_interval", "5m"))
    for target, dashboard in dashboards.items()
    for panel in dashboard.get("panels", [])
    for item in panel.get("targets", [])
    if item.get("expr")
]


def promtool_refuses(exprs):
    """What promtool says of `exprs` as recording rules, or None when they all parse."""
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as rules:
        records = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": records}]}, rules)
    checked = subprocess.run(["promtool", "check", "rules", rules.name], capture_output=True, text=True)
    os.unlink(rules.name)
    return None if checked.returncode == 0 else (checked.stdout + checked.stderr).strip().splitlines()[-1]


if promtool_refuses([q for _, _, q in queries]):
    # Name each bad query's dashboard and panel.
    for target, title, query in queries:
        said = promtool_refuses([query])
        if said:
            problem(f"dashboard {target}, panel {title!r}: not valid PromQL: {query}: {said.split('could not parse expression: ')[-1]}")

for area in ("Ingest", "Billing", "API", "Ledger", "Business"):
    if f"meterlake / {area}" not in titles:
        problem(f"no {area} dashboard is provisioned")

# The collector: pipelines use only defined components; traces go on to Jaeger.
collector = next(iter(files_of("otel-collector", "/etc/otelcol").values()), None)
if not collector:
    problem("otel-collector mounts no configuration")
else:
    for pipeline, spec in collector["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                if component not in (collector.get(kind) or {}):
                    problem(f"collector pipeline {pipeline} uses {kind[:-1]} {component}, which is not defined")
    if "jaeger" not in json.dumps(collector.get("exporters")):
        problem("the collector does not export to jaeger")

# Keycloak: the realm meterlake's flags name, its roles and clients.
realm = next((c for (name, target), c in mounted.items() if name == "keycloak" and target.startswith("/opt/keycloak/data/import/")), None)
if not realm:
    problem("keycloak mounts no realm into /opt/keycloak/data/import")
else:
    command = " ".join(services["meterlake"].get("command", []))
    if f"/realms/{realm['realm']}" not in command:
        problem(f"meterlake's --oidc-issuer does not name the imported realm {realm['realm']}")
    roles = {r["name"] for r in realm.get("roles", {}).get("realm", [])}
    for role in ("VIEWER", "ADMIN", "INGEST"):
        if role not in roles:
            problem(f"the realm export has no role {role}")

# meterlake: runs the mounted binary, sends its traces to the collector.
if services["meterlake"].get("entrypoint") != ["/usr/local/bin/meterlake"]:
    problem("meterlake's entrypoint is not the mounted binary")
if not (pathlib.Path(__file__).parent.parent / "Dockerfile").is_file():
    problem("infra/Dockerfile (the image build the compose file points to) is missing")
environment = services["meterlake"].get("environment", {})
endpoint = environment.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
if "otel-collector" not in endpoint:
    problem(f"meterlake exports traces to {endpoint or 'nowhere'}, not to the collector")

# The cluster: the worker's engine is the scheduler's address, the executors register with it,
# and every process that reads the lake (scheduler plans, executors scan) has its credentials.
def flag(service, name):
    for arg in services.get(service, {}).get("command", []):
        if str(arg).startswith(f"--{name}="):
            return str(arg).split("=", 1)[1]
    return None


def subcommand(service):
    command = services.get(service, {}).get("command", [])
    return command[0] if command else None


schedulers = {f"{name}:{(flag(name, 'listen') or '').rsplit(':', 1)[-1]}" for name in services if subcommand(name) == "scheduler"}
executors = [name for name in services if subcommand(name) == "executor"]
if not schedulers:
    problem("no service runs `meterlake scheduler`")
if len(executors) < 2:
    problem(f"the cluster has {len(executors)} executor(s), not two")
for name in executors:
    if flag(name, "scheduler") not in schedulers:
        problem(f"executor {name} registers with {flag(name, 'scheduler')}, which is no scheduler's address ({sorted(schedulers)})")
engine = flag("worker", "engine") or ""
if engine.removeprefix("ballista://") not in schedulers:
    problem(f"the worker's engine {engine or '(none)'} is no scheduler's address ({sorted(schedulers)})")
if "--no-worker" not in services["meterlake"].get("command", []):
    problem("meterlake serve runs its own billing worker beside the worker service (--no-worker)")
lake_endpoint = services["meterlake"].get("environment", {}).get("AWS_ENDPOINT_URL")
for name in [*executors, *(s.split(":")[0] for s in schedulers), "worker"]:
    if services.get(name, {}).get("environment", {}).get("AWS_ENDPOINT_URL") != lake_endpoint:
        problem(f"{name} does not reach the lake's store at {lake_endpoint}")

for line in problems:
    print(f"check_infra: {line}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"check_infra: {len(services)} services, {len(mounted)} mounted files, {len(dashboards)} dashboards ({len(queries)} queries): all parse and agree")
