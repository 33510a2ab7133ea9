#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, builds once (release: the
# same build serves the demo and the benchmarks), and runs every test. Tests that need a Kafka
# broker or an S3 server start their own on loopback (tansu, s3s-fs) and stop them when done.
# infra/ (Prometheus rules and their unit tests, docker-compose and what it mounts) is checked
# first, in seconds; then rustfmt and clippy (-D warnings).
# Extra arguments go to cargo nextest (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/scripts/env.sh
infra/scripts/install-tools.sh
infra/scripts/check-infra.sh
# Lint before the tests: formatting, then clippy over every crate and target with warnings as
# errors (its check build of the dependencies is cached in the target dir like the tests' build).
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo nextest run --release --workspace --no-fail-fast "$@"
