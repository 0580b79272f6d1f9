#!/usr/bin/env bash
# The floor under PostgreSQL's queue work, by queue design: 20,000 deliveries over 200 chains
# (100 each, interleaved, ~1 KiB bodies), finished head by head in transactions of <batch>
# completions, each promoting its chain's next delivery — done server-side by a PL/pgSQL
# procedure, so no client, network or relay cost is counted: only the statements' own work
# (index upkeep, heap and WAL). Three designs, on the relay's own schema (migrations/postgres/):
#
#   rows    today's: a chain's state on every row; a completion updates the head's row to
#           `delivered`, a promotion updates the next row to `ready` (both non-HOT updates of a
#           row with eight indexes);
#   rows+run  `rows` with the index of queued rows by run that migrations/postgres/0009 drops;
#   chains  a row a chain (`chains`: its head, due time, lease); a completion still updates the
#           head's row, a promotion is the chain row's update (the design built on SQLite in the
#           sixteenth session, docs/BENCHMARKS.md);
#   cursor  `chains` and an `outcomes` table: a completion appends the outcome and the delivery's
#           row is never written again (the plan in docs/BENCHMARKS.md, fifteenth session).
#
#   scripts/pg-queue-floor.sh [batch] [runs] [synchronous_commit]
#
# Defaults: 20 completions a transaction (the relay's outcome writer's batches in the e2e bench),
# 2 runs, `synchronous_commit = off` (the statements' CPU, not the WAL's sync). Prints seconds
# and WAL bytes an event for each design and run. Starts a PostgreSQL server of its own in a
# temporary folder (Debian's postgresql package; run as root, the server as `postgres`).
set -euo pipefail
batch=${1:-20}
runs=${2:-2}
sync=${3:-off}
cd "$(dirname "$0")/.."
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
tmp=$(mktemp -d)
chown postgres "$tmp"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop() { runuser -u postgres -- "$bin/pg_ctl" -D "$tmp/d" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap stop EXIT
runuser -u postgres -- "$bin/initdb" -D "$tmp/d" -A trust >/dev/null
runuser -u postgres -- "$bin/pg_ctl" -D "$tmp/d" -l "$tmp/log" -w \
  -o "-p $port -k $tmp -c listen_addresses=127.0.0.1 -c fsync=on" start >/dev/null
export PGOPTIONS="-c client_min_messages=warning"
P=(psql -q -v ON_ERROR_STOP=1 -h "$tmp" -p "$port" -U postgres -d postgres)
for f in migrations/postgres/*.sql; do "${P[@]}" -f "$f" >/dev/null; done

# Each run starts from the schema as migrated, then takes a design's own tables and indexes.
"${P[@]}" >/dev/null <<'SQL'
CREATE PROCEDURE populate() LANGUAGE plpgsql AS $$
BEGIN
  DROP TABLE IF EXISTS chains, outcomes;
  DROP INDEX IF EXISTS deliveries_chain, deliveries_run;
  CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at, seq) WHERE state = 'ready';
  CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries(order_key, seq) WHERE state IN ('ready', 'waiting', 'paused');
  TRUNCATE deliveries, delivery_bodies RESTART IDENTITY;
  INSERT INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, order_key, state,
                          attempts, next_attempt_at, created_at)
  SELECT gen_random_uuid()::text, gen_random_uuid()::text, 'record', 'run-' || (i % 200) || '-' || md5((i % 200)::text),
         'webhook', 'wh-0190d3b2-7c2e-7a3c-9a1e-3f2b1c0d9e8f', 'http://127.0.0.1:9999/hook',
         'w:wh-0190d3b2-7c2e-7a3c-9a1e-3f2b1c0d9e8f',
         'w:wh-0190d3b2-7c2e-7a3c-9a1e-3f2b1c0d9e8f:run-' || (i % 200) || '-' || md5((i % 200)::text),
         CASE WHEN i < 200 THEN 'ready' ELSE 'waiting' END, 0, 0, 0
    FROM generate_series(0, 19999) AS i ORDER BY i;
  INSERT INTO delivery_bodies (seq, body) SELECT seq, repeat('x', 1000) FROM deliveries;
END $$;

CREATE PROCEDURE make_chains(with_outcomes boolean) LANGUAGE plpgsql AS $$
BEGIN
  CREATE TABLE chains (key text PRIMARY KEY, head bigint NOT NULL, state text NOT NULL,
                       next_attempt_at bigint NOT NULL, lease_owner text, lease_until bigint);
  CREATE INDEX chains_due ON chains(next_attempt_at) WHERE state = 'ready';
  DROP INDEX deliveries_key, deliveries_due;
  CREATE INDEX deliveries_chain ON deliveries(order_key, seq);
  UPDATE deliveries SET state = 'waiting' WHERE state = 'ready';
  INSERT INTO chains SELECT order_key, MIN(seq), 'ready', 0, NULL, NULL FROM deliveries GROUP BY order_key;
  IF with_outcomes THEN
    CREATE TABLE outcomes (seq bigint PRIMARY KEY, state text NOT NULL, attempts bigint, first_attempt_at bigint,
                           last_status bigint, last_error text, last_duration_ms bigint, last_excerpt text,
                           finished_at bigint NOT NULL);
    CREATE INDEX outcomes_finished ON outcomes(finished_at);
  END IF;
END $$;

-- Finish the ready heads, `batch` a transaction, until none is left. rows: the relay's
-- statements (`complete_rows`, `promote_next`), a completion at a time; chains / cursor: the
-- head's row updated or its outcome appended, then the chain moved to its next row.
CREATE PROCEDURE run_design(design text, batch int) LANGUAGE plpgsql AS $$
DECLARE r record; n int; nxt bigint;
BEGIN
  LOOP
    n := 0;
    FOR r IN EXECUTE CASE design
        WHEN 'rows' THEN 'SELECT seq AS head, order_key AS key FROM deliveries WHERE state = ''ready''
                          ORDER BY next_attempt_at, seq LIMIT $1'
        ELSE 'SELECT head, key FROM chains WHERE state = ''ready'' ORDER BY next_attempt_at, head LIMIT $1'
      END USING batch LOOP
      IF design = 'rows' THEN
        UPDATE deliveries SET state = 'delivered', attempts = 1, next_attempt_at = 1, first_attempt_at = 1,
               last_status = 200, finished_at = 1, last_duration_ms = 3, lease_owner = NULL, lease_until = NULL
         WHERE seq = r.head AND state = 'ready';
        UPDATE deliveries SET state = 'ready', next_attempt_at = 2, lease_owner = 'me', lease_until = 99
         WHERE seq = ANY(ARRAY(SELECT (SELECT x.seq FROM deliveries x WHERE x.order_key = r.key
               AND x.state IN ('ready', 'waiting', 'paused') ORDER BY x.seq LIMIT 1))) AND (state = 'waiting') IS TRUE;
      ELSE
        IF design = 'cursor' THEN
          INSERT INTO outcomes (seq, state, attempts, first_attempt_at, last_status, last_duration_ms, finished_at)
          VALUES (r.head, 'delivered', 1, 1, 200, 3, 1);
          SELECT x.seq INTO nxt FROM deliveries x WHERE x.order_key = r.key AND x.seq > r.head
           AND NOT EXISTS (SELECT 1 FROM outcomes o WHERE o.seq = x.seq) ORDER BY x.seq LIMIT 1;
        ELSE
          UPDATE deliveries SET state = 'delivered', attempts = 1, next_attempt_at = 1, first_attempt_at = 1,
                 last_status = 200, finished_at = 1, last_duration_ms = 3 WHERE seq = r.head;
          SELECT x.seq INTO nxt FROM deliveries x WHERE x.order_key = r.key AND x.seq > r.head
           AND x.finished_at IS NULL ORDER BY x.seq LIMIT 1;
        END IF;
        IF nxt IS NULL THEN
          DELETE FROM chains WHERE key = r.key;
        ELSE
          UPDATE chains SET head = nxt, next_attempt_at = 2, lease_owner = 'me', lease_until = 99 WHERE key = r.key;
        END IF;
      END IF;
      n := n + 1;
    END LOOP;
    COMMIT;
    EXIT WHEN n = 0;
  END LOOP;
END $$;
SQL

echo "| design | run | seconds for 20,000 completions | WAL an event | left unfinished |"
echo "|---|---:|---:|---:|---:|"
for run in $(seq 1 "$runs"); do
  for design in rows+run rows chains cursor; do
    "${P[@]}" -c "CALL populate()" >/dev/null
    left="SELECT COUNT(*) FROM deliveries WHERE finished_at IS NULL"
    case $design in
      rows+run) "${P[@]}" -c "CREATE INDEX deliveries_run ON deliveries(run_id) WHERE state IN ('ready', 'waiting', 'paused')" >/dev/null ;;
      chains) "${P[@]}" -c "CALL make_chains(false)" >/dev/null ;;
      cursor) "${P[@]}" -c "CALL make_chains(true)" >/dev/null; left="SELECT 20000 - COUNT(*) FROM outcomes" ;;
    esac
    call="CALL run_design('${design%+run}', $batch)"
    # Statistics for the tables read, not for `outcomes` while it is empty: analysed empty, the
    # next-row probe's anti-join is planned as a scan of it (seconds instead of milliseconds).
    "${P[@]}" -c "VACUUM ANALYZE deliveries" -c "VACUUM ANALYZE delivery_bodies" >/dev/null
    case $design in chains|cursor) "${P[@]}" -c "ANALYZE chains" >/dev/null ;; esac
    "${P[@]}" -c "CHECKPOINT" >/dev/null
    w0=$("${P[@]}" -At -c "SELECT pg_current_wal_lsn()")
    t0=$(date +%s.%N)
    PGOPTIONS="$PGOPTIONS -c synchronous_commit=$sync" "${P[@]}" -c "$call" >/dev/null
    t1=$(date +%s.%N)
    wal=$("${P[@]}" -At -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$w0')")
    echo "| $design | $run | $(python3 -c "print(f'{$t1 - $t0:.2f}')") | $((${wal%.*} / 20000)) B | $("${P[@]}" -At -c "$left") |"
  done
done
