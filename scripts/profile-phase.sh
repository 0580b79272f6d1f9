#!/usr/bin/env bash
# Profile the relay over one benchmark phase only: `perf record` (DWARF call graphs) of the relay
# process the e2e benchmark starts, switched on when the bench announces the phase and off when it
# reports the phase's relay CPU, so the profile is the phase the CPU ratio is measured over and not
# the 10 s latency phase after it (which dominated a whole-run profile: docs/BENCHMARKS.md,
# eleventh session).
#
#   scripts/profile-phase.sh <relay binary> <scenario> <out.data> [frequency]
#
# <scenario> is `embedded`, `postgres` or `kafka`: the bench's `--only` names whose throughput
# phase is announced on stderr ("<scenario>: N runs …"; Kafka's after its warm-up, "  kafka (1024
# B): throughput phase") and ends with "  <scenario>: relay CPU …".
# The bench is the newest `target/release/deps/e2e-*` (build it with `cargo bench --bench e2e
# --no-run`). Read the profile with `perf report -i <out.data> --children`.
set -euo pipefail
bin=$(realpath "$1")
scen=$2
out=$3
freq=${4:-999}
cd "$(dirname "$0")/.."
bench=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkfifo "$tmp/ctl" "$tmp/ack"
case $scen in
  kafka) start='^  kafka \(1024 B\): throughput phase' ;;
  *) start="^$scen: .* runs" ;;
esac
E2E_RELAY_BIN=$bin "$bench" --bench --only "$scen" --runs 1 >"$tmp/out" 2>"$tmp/err" &
bench_pid=$!
pid=""
for _ in $(seq 1 600); do
  pid=$(pgrep -f "^$bin" | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.05
done
[ -n "$pid" ] || { echo "the relay did not start" >&2; exit 1; }
perf record -F "$freq" --call-graph dwarf,16384 -D -1 --control "fifo:$tmp/ctl,$tmp/ack" -o "$out" -p "$pid" 2>/dev/null &
perf_pid=$!
exec 7>"$tmp/ctl" 8<"$tmp/ack"
state=off
while kill -0 "$bench_pid" 2>/dev/null; do
  if [ $state = off ] && grep -qE "$start" "$tmp/err"; then
    echo enable >&7; read -r -t 2 _ <&8 || true; state=on
  elif [ $state = on ] && grep -q "^  $scen: relay CPU" "$tmp/err"; then
    echo disable >&7; read -r -t 2 _ <&8 || true; state=done
  fi
  sleep 0.01
done
sleep 0.3
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" || true
grep -E "^  $scen: (relay CPU|accepted)" "$tmp/err" || true
grep -E '^\| (Relay CPU|Embedded bus e2e|Kafka e2e|PostgreSQL)' "$tmp/out" | cut -c1-200 || true
