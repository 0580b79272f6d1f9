#!/usr/bin/env bash
# Where the PostgreSQL store's time goes over the e2e benchmark's `postgres` scenario: the
# statements the relay ran, from `pg_stat_statements` (which the bench's server loads), with their
# time a row; and, given a threshold in ms, the plans of every statement slower than that
# (`auto_explain` with ANALYZE and BUFFERS), kept in <out>/plans.log.
#
#   scripts/pg-statements.sh <relay binary> <out dir> [auto_explain threshold ms]
#
# The view is read every 0.3 s while the scenario runs (the bench removes its server when the
# scenario ends), so the last reading misses at most the last 0.3 s. The bench is the newest
# `target/release/deps/e2e-*` (`cargo bench --bench e2e --no-run`). With a threshold, the plans'
# logging costs time of its own: compare statements' times between runs made the same way.
set -euo pipefail
bin=$(realpath "$1")
out=$2
explain=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
bench=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)
opts=""
if [ -n "$explain" ]; then
  opts="-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=$explain \
-c auto_explain.log_analyze=on -c auto_explain.log_buffers=on"
fi
SYNCRELAY_TEST_PG_OPTIONS="$opts" E2E_RELAY_BIN=$bin "$bench" --bench --only postgres --runs 1 \
  >"$out/bench.out" 2>&1 &
bench_pid=$!
port=""
dir=""
while kill -0 "$bench_pid" 2>/dev/null; do
  if [ -z "$port" ]; then
    line=$(pgrep -fa "postgres -D [^ ]*/syncrelay-pg-" | head -1 || true)
    port=$(grep -o -- "-p [0-9]*" <<<"$line" | awk '{print $2}' || true)
    dir=$(grep -o -- "-D [^ ]*" <<<"$line" | awk '{print $2}' || true)
  fi
  if [ -n "$port" ]; then
    db=$(psql -h 127.0.0.1 -p "$port" -U postgres -Atc \
      "SELECT datname FROM pg_database WHERE datname LIKE 'test_%' LIMIT 1" 2>/dev/null || true)
    if [ -n "$db" ]; then
      psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -qc \
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null 2>&1 || true
      psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -c \
        "SELECT calls, round(total_exec_time::numeric, 1) AS ms, rows,
                round((1000 * total_exec_time / greatest(rows, 1))::numeric, 1) AS us_a_row,
                left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS statement
         FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'
         ORDER BY total_exec_time DESC LIMIT 15" >"$out/statements.tmp" 2>/dev/null &&
        mv "$out/statements.tmp" "$out/statements.txt"
    fi
    if [ -n "$explain" ] && [ -n "$dir" ]; then
      cp "$dir/server.log" "$out/plans.log" 2>/dev/null || true
    fi
  fi
  sleep 0.3
done
grep -E "^  postgres: (accepted|relay CPU)" "$out/bench.out" || true
cat "$out/statements.txt"
