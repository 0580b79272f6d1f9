#!/usr/bin/env bash
# Fuzz the parsers that see untrusted bytes, SECONDS each (default 60). Not part of CI.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Targets (fuzz/, a crate of its own outside the project's build; bodies in fuzz/src/lib.rs):
#   envelope     POST /events bodies: api::parse_events (repeated keys, batch and event sizes,
#                domain::Envelope::parse); accepted events round-trip through their stored form
#   sync_job     sync jobs: error::parse_json + runs::validate::validate_job (+ run args against
#                the job's args_schema); refusals name a field, validation is idempotent
#   retry_after  Retry-After values: delivery::retry::parse_retry_after and the delay it leads to
#   cursor       list cursors: store::parse_cursor
#
# With a nightly toolchain (rustup's `nightly`), each target runs under libFuzzer via cargo fuzz
# (installed with `cargo install cargo-fuzz` when missing), starting from fuzz/corpus/<target>
# and keeping what it learns in fuzz/target/corpus/<target>; a crash is saved under
# fuzz/artifacts/<target>/ and reproduced with `cargo +nightly fuzz run <target> <file>`.
# Without nightly, the same targets run as plain tests on the stable toolchain: the seed corpus,
# then mutations of it from a small deterministic mutator (fuzz/tests/corpus.rs), SECONDS each.
#
# Environment: FUZZ_SANITIZER (cargo fuzz --sanitizer, default none: the relay forbids unsafe code,
# and with `address` the C libraries built by -sys crates get ASAN flags that librdkafka's
# configure step cannot link),
# FUZZ_JOBS (parallel libFuzzer jobs per target, default 1), FUZZ_STABLE=1 (the stable runner
# even when nightly is there). The first build compiles the relay and its dependencies for the
# fuzzer (librdkafka included): several minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

SECONDS_EACH="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(envelope sync_job retry_after cursor)
fi
case "$SECONDS_EACH" in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

have_nightly() {
    command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1
}

if [ "${FUZZ_STABLE:-0}" != 1 ] && have_nightly; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "== installing cargo-fuzz (once per machine)"
        cargo install cargo-fuzz --locked
    fi
    jobs=()
    if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
    for t in "${TARGETS[@]}"; do
        echo "== cargo fuzz run $t for ${SECONDS_EACH}s"
        mkdir -p "target/corpus/$t"
        cargo +nightly fuzz run --sanitizer "${FUZZ_SANITIZER:-none}" "$t" "target/corpus/$t" "corpus/$t" -- \
            -max_total_time="$SECONDS_EACH" -max_len=65536 -rss_limit_mb=4096 -timeout=10 \
            -print_final_stats=1 "${jobs[@]}"
    done
else
    echo "== no nightly toolchain: the targets as stable tests, ${SECONDS_EACH}s each"
    for t in "${TARGETS[@]}"; do
        FUZZ_SECONDS="$SECONDS_EACH" cargo test --release --test corpus -- --exact "$t" --nocapture
    done
fi
echo "== fuzzing done: no crash"
