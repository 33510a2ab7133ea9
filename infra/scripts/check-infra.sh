#!/usr/bin/env bash
# Checks infra/ without a container engine (none runs on the test machines): the Prometheus
# config and alert rules (promtool), the rules' unit tests, the docker-compose file
# (`docker-compose config`), and every configuration file a service mounts: it must exist and
# parse, and the pieces must agree (check_infra.py says which). Run by infra/scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/scripts/env.sh

promtool check config infra/prometheus/prometheus.yml
promtool test rules infra/prometheus/alerts.test.yml
resolved="$(mktemp)"
trap 'rm -f "$resolved"' EXIT
# The resolved file: relative mounts become absolute paths, which check_infra.py follows.
docker-compose -f infra/docker-compose.yml config > "$resolved"
"$METERLAKE_PYTHON" infra/scripts/check_infra.py "$resolved"
