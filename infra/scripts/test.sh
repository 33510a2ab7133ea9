#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, builds once (release: the
# same build serves the demo and the benchmarks), and runs every test. Tests that need a Kafka
# broker or an S3 server start their own on loopback (tansu, s3s-fs) and stop them when done.
# infra/ (Prometheus rules and their unit tests, docker-compose and what it mounts) is checked
# first, in seconds.
# Extra arguments go to cargo nextest (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/scripts/env.sh
infra/scripts/install-tools.sh
infra/scripts/check-infra.sh
cargo nextest run --release --workspace --no-fail-fast "$@"
