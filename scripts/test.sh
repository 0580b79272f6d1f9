#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs every test.
#   unit + integration tests (cargo test: real HTTP receivers, the real binary, real SQLite, a real
#   tansu broker, a real PostgreSQL the tests start themselves)
#   the dashboard/alert check against a real Prometheus (tests/prometheus/check.sh)
#   schemathesis against the relay's own OpenAPI document (scripts/schemathesis.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TERM_COLOR=never
if ! command -v cargo >/dev/null; then
    echo "cargo is required (rustup: https://rustup.rs)" >&2
    exit 1
fi

# The Kafka tests run against a real Kafka-protocol broker, tansu, built from crates.io once per
# machine (about 10 minutes the first time).
if [ -n "${TANSU_BIN:-}" ] && [ -x "$TANSU_BIN" ]; then
    :
elif [ -x "$HOME/.cargo/bin/tansu" ]; then
    export TANSU_BIN="$HOME/.cargo/bin/tansu"
else
    echo "== installing the tansu broker (once per machine)"
    cargo install tansu --locked --version 0.6.0 --features dynostore,libsql
    export TANSU_BIN="$HOME/.cargo/bin/tansu"
fi

# The PostgreSQL tests start their own server (tests/support/postgres.rs) from Debian's binaries.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root (or sudo) to run: $*" >&2
        exit 1
    fi
}
if [ -z "${PG_BIN:-}" ] && [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    echo "== installing PostgreSQL (once per machine)"
    # Keep the package's own cluster from starting (the tests run their own server).
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy"
        created_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update && apt-get install -y postgresql'
    if [ "$created_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
fi

echo "== cargo build"
cargo build --locked --all-targets

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo test"
set +e
# --no-fail-fast: every test binary runs even after one fails, so the counts below are complete.
cargo test --locked --no-fail-fast --lib --bins --tests -- --test-threads 2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed;' | awk '{s+=$1} END {print s+0}')
if [ "$status" -ne 0 ]; then
    echo "tests: $passed passed, $((failed > 0 ? failed : 1)) failed"
    exit "$status"
fi

echo "== dashboards and alerts against a real Prometheus"
if SYNCRELAY_BIN="$PWD/target/debug/syncrelay" bash tests/prometheus/check.sh; then
    passed=$((passed + 1))
else
    failed=$((failed + 1))
fi

# The API fuzzed against its own OpenAPI document (scripts/schemathesis.sh: a pinned schemathesis
# in target/venv, the debug relay in a loopback-only network namespace, about two minutes).
echo "== schemathesis against GET /openapi.json"
if SYNCRELAY_BIN="$PWD/target/debug/syncrelay" bash scripts/schemathesis.sh; then
    passed=$((passed + 1))
else
    failed=$((failed + 1))
fi

echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
