#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs every test.
#   unit + integration tests (cargo test: real HTTP receivers, the real binary, real SQLite)
#   the dashboard/alert check against a real Prometheus (tests/prometheus/check.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TERM_COLOR=never
if ! command -v cargo >/dev/null; then
    echo "cargo is required (rustup: https://rustup.rs)" >&2
    exit 1
fi

echo "== cargo build"
cargo build --locked --all-targets

echo "== cargo test"
cargo test --locked -- --test-threads 2

echo "== dashboards and alerts against a real Prometheus"
SYNCRELAY_BIN="$PWD/target/debug/syncrelay" bash tests/prometheus/check.sh
