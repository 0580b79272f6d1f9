#!/usr/bin/env bash
# Fuzz the running API with schemathesis against its own OpenAPI document (`GET /openapi.json`).
#
#   1. a Python venv with schemathesis (pinned) in target/venv, made once per machine,
#   2. the debug relay (target/debug/syncrelay, or $SYNCRELAY_BIN) with a token, a throw-away data
#      folder and loopback receivers allowed, inside a fresh network namespace that has only a
#      loopback interface: generated webhook targets and callback URLs can name any address, and
#      the relay must never send a generated request anywhere but this machine,
#   3. `schemathesis run` with the bearer token on every operation (examples, coverage, fuzzing
#      and stateful phases following the document's links, positive and negative data), with
#      every check but positive_data_acceptance: not_a_server_error, response_schema_conformance,
#      status_code_conformance, content_type_conformance, response_headers_conformance,
#      negative_data_rejection, unsupported_method, use_after_free, ensure_resource_availability,
#      ignored_auth, …; bounded by SCHEMATHESIS_MAX_TIME seconds (default 120).
#
# Exits non-zero when schemathesis reports a failure, or when the relay logged an internal
# error. Environment: SYNCRELAY_BIN, SCHEMATHESIS_MAX_TIME (seconds), SCHEMATHESIS_MAX_EXAMPLES
# (per operation, default 100), SCHEMATHESIS_SEED, SCHEMATHESIS_CHECKS and
# SCHEMATHESIS_EXCLUDE_CHECKS (comma-separated), SCHEMATHESIS_VENV, KEEP_TMP=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERSION=4.32.5
VENV="${SCHEMATHESIS_VENV:-$ROOT/target/venv}"
BIN="${SYNCRELAY_BIN:-$ROOT/target/debug/syncrelay}"
MAX_TIME="${SCHEMATHESIS_MAX_TIME:-120}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-100}"

log() { printf '[schemathesis] %s\n' "$*" >&2; }
die() { printf '[schemathesis] FAIL: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- the venv (once per machine)
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $VERSION" ]; then
    log "installing schemathesis $VERSION into $VENV"
    command -v python3 >/dev/null || die "python3 is needed"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV"; then
        # Debian's python3 keeps venv in a package of its own.
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2 \
                || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2; }
        fi
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi
"$VENV/bin/schemathesis" --version >&2

[ -x "$BIN" ] || cargo build --locked --bin syncrelay
[ -x "$BIN" ] || die "no relay binary at $BIN"

# ---------------------------------------------------------------- an isolated network
# `unshare --net` (root), or a user namespace with its own network where root is not available.
if unshare --net true 2>/dev/null; then
    ISOLATE=(unshare --net)
elif unshare --user --map-root-user --net true 2>/dev/null; then
    ISOLATE=(unshare --user --map-root-user --net)
else
    die "cannot make a network namespace (unshare --net); the fuzzer's generated URLs must not leave this machine"
fi

TMP="$(mktemp -d)"
cleanup() {
    if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# Every check but positive_data_acceptance: a schema-valid request may still be refused for
# what a schema cannot say (a host name that does not resolve, a sync job id that does not exist).
CHECKS="${SCHEMATHESIS_CHECKS:-all}"
EXCLUDE="${SCHEMATHESIS_EXCLUDE_CHECKS-positive_data_acceptance}"
export TMP BIN VENV MAX_TIME MAX_EXAMPLES CHECKS EXCLUDE
export SEED="${SCHEMATHESIS_SEED:-}"
started=$(date +%s)
set +e
"${ISOLATE[@]}" bash -euo pipefail -c '
    ip link set lo up 2>/dev/null || true
    cd "$TMP"   # schemathesis keeps its state in ./.schemathesis
    PORT=18080
    TOKEN=schemathesis-token
    SYNCRELAY__HTTP__LISTEN="127.0.0.1:$PORT" \
    SYNCRELAY__AUTH__TOKENS="[\"$TOKEN\"]" \
    SYNCRELAY__STORE__PATH="$TMP/data/syncrelay.db" \
    SYNCRELAY__STORE__SYNCHRONOUS=normal \
    SYNCRELAY__DELIVERY__ALLOWED_CIDRS="[\"127.0.0.0/8\"]" \
    SYNCRELAY__DELIVERY__CONNECT_TIMEOUT_MS=1000 \
    SYNCRELAY__DELIVERY__REQUEST_TIMEOUT_MS=2000 \
    SYNCRELAY__HTTP__WORKERS=2 \
    NO_COLOR=1 \
        "$BIN" >"$TMP/relay.log" 2>&1 &
    relay=$!
    trap "kill $relay 2>/dev/null; wait $relay 2>/dev/null" EXIT
    for _ in $(seq 1 100); do
        if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen(\"http://127.0.0.1:$PORT/health/live\", timeout=1)" 2>/dev/null; then
            break
        fi
        kill -0 $relay 2>/dev/null || { cat "$TMP/relay.log" >&2; exit 3; }
        sleep 0.1
    done
    args=(
        run "http://127.0.0.1:$PORT/openapi.json"
        --header "Authorization: Bearer $TOKEN"
        --checks "$CHECKS"
        --max-time "$MAX_TIME"
        --max-examples "$MAX_EXAMPLES"
        --request-timeout 15
        --workers 1
        --no-color
        --generation-database none
        --report junit --report-dir "$TMP/report"
    )
    if [ -n "$EXCLUDE" ]; then args+=(--exclude-checks "$EXCLUDE"); fi
    if [ -n "$SEED" ]; then args+=(--seed "$SEED"); fi
    "$VENV/bin/schemathesis" "${args[@]}"
'
status=$?
set -e
log "run time $(( $(date +%s) - started )) s"

# Any internal error the relay logged is a failure even when no check caught it.
if grep -q 'internal error' "$TMP/relay.log" 2>/dev/null; then
    log "the relay logged internal errors:"
    grep 'internal error' "$TMP/relay.log" | head -n 20 >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    log "relay log (last 40 lines):"
    tail -n 40 "$TMP/relay.log" >&2 || true
    die "schemathesis found failures (exit $status)"
fi
log "ok"
