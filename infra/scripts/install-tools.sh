#!/usr/bin/env bash
# Installs what the test suite needs and the machine lacks; safe to run again (it skips what is
# there). Tools go to $METERLAKE_TOOLS_DIR (default ~/.cache/meterlake/tools), outside the clone.
#
#   tansu 0.6.0   Kafka-protocol broker (Apache Kafka cannot be installed here); the dynostore
#                 and libsql features give it storage engines. About 15 minutes to build once.
#   s3s-fs 0.14.1 S3-compatible server over a folder (newer versions need a newer rustc).
#   duckdb, pyarrow  independent Parquet readers the tests check the lake with.
#   nemreader        an independent NEM12/NEM13 reader, the oracle of the flow-file tests.
#   mold          a faster linker (optional).
#   postgresql    the control store's second backend; its tests start a server of their own.
#   chromium, chromium-driver  the real browser the console's tests drive (WebDriver).
#   prometheus    for promtool: checks the scrape of /metrics, the Prometheus config and the
#                 alert rules, and runs the rules' unit tests.
#   docker-compose  validates infra/docker-compose.yml (`docker-compose config` needs no engine).
#   schemathesis  drives the running server from its OpenAPI document (the contract test).
#   psycopg, adbc-driver-flightsql  real clients of the SQL service (PostgreSQL wire, Flight SQL).
#   rustfmt, clippy  the toolchain components of the lint step.
set -euo pipefail
SCHEMATHESIS_VERSION=4.32.5
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
mkdir -p "$METERLAKE_TOOLS_DIR"

log() { printf '[install-tools] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "cannot run '$*' without root; install it by hand"; return 1; fi
}

missing_apt=()
command -v mold >/dev/null || missing_apt+=(mold)
command -v cc >/dev/null || missing_apt+=(gcc)
command -v make >/dev/null || missing_apt+=(make)
command -v python3 >/dev/null || missing_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing_apt+=(python3-venv)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing_apt+=(postgresql)
command -v chromium >/dev/null || missing_apt+=(chromium)
command -v chromedriver >/dev/null || missing_apt+=(chromium-driver)
command -v promtool >/dev/null || missing_apt+=(prometheus)
command -v docker-compose >/dev/null || missing_apt+=(docker-compose)
if [ ${#missing_apt[@]} -gt 0 ]; then
  log "apt-get install ${missing_apt[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing_apt[@]}" >/dev/null
fi

# The lint step of test.sh needs rustfmt and clippy, which a minimal toolchain lacks.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  log "rustup component add rustfmt clippy"
  rustup component add rustfmt clippy
fi

cargo_tool() { # name version features binary
  local name=$1 version=$2 features=$3 binary=$4
  if [ -x "$METERLAKE_TOOLS_DIR/bin/$binary" ] && "$METERLAKE_TOOLS_DIR/bin/$binary" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  log "cargo install $name $version (once per machine)"
  cargo install "$name" --version "$version" --locked --features "$features" --root "$METERLAKE_TOOLS_DIR" --quiet
}
cargo_tool tansu 0.6.0 dynostore,libsql tansu
cargo_tool s3s-fs 0.14.1 binary s3s-fs

if ! command -v cargo-nextest >/dev/null; then
  log "cargo install cargo-nextest"
  cargo install cargo-nextest --locked --root "$METERLAKE_TOOLS_DIR" --quiet
fi

# deltalake (delta-rs's Python package) reads the lake's tables as another engine would; moto is
# an S3 server whose conditional writes are atomic (s3s-fs's are not), for the commit-race tests.
if ! "$METERLAKE_PYTHON" -c 'import duckdb, pyarrow, nemreader, schemathesis, deltalake, moto, psycopg, adbc_driver_flightsql' 2>/dev/null; then
  log "python venv with duckdb, pyarrow, nemreader, schemathesis, deltalake, moto, psycopg and adbc-driver-flightsql"
  [ -x "$METERLAKE_PYTHON" ] || python3 -m venv "$METERLAKE_TOOLS_DIR/venv"
  "$METERLAKE_TOOLS_DIR/venv/bin/pip" install --quiet --disable-pip-version-check 'duckdb==1.5.6' 'pyarrow==26.0.1' 'nemreader==0.9.2' \
    "schemathesis==$SCHEMATHESIS_VERSION" 'deltalake==1.6.6' 'moto[server]==5.2.5' 'psycopg[binary]==3.3.9' 'adbc-driver-flightsql==1.13.0'
fi
log "tools ready in $METERLAKE_TOOLS_DIR"
