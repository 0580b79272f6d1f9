#!/usr/bin/env bash
# Real check of dashboards/syncrelay.json and dashboards/alerts.yml against a real Prometheus.
#
#   1. installs Prometheus from Debian's packages when prometheus/promtool are missing
#      (the package's own service is kept from starting; this script runs its own process),
#   2. `promtool check rules dashboards/alerts.yml`,
#   3. starts a tansu Kafka broker ($TANSU_BIN, default ~/.cargo/bin/tansu, in-memory storage) on a
#      free loopback port and creates the topics (2 partitions each), then syncrelay ($SYNCRELAY_BIN,
#      default target/debug/syncrelay, built when missing) in Kafka mode (`bus.kind = "kafka"`) on a
#      free loopback port with a throw-away store, a python3 receiver (200 on /ok, 500 on /fail) and
#      Prometheus scraping syncrelay every second with the alert rules loaded; waits until the
#      consumer group has assigned partitions,
#   4. sends a small load through the API (`POST /events` produces to the topic, the consumer
#      delivers): successes, a few events to /fail that are parked, retried and then dead-lettered,
#      and one sync job run (created through the API) taken through started, a record and completed,
#   5. evaluates every dashboard panel query and every alert expression through Prometheus's HTTP
#      API and prints one line per query with the number of series it returned.
#
# Fails when promtool rejects the rules, when any query does not parse / errors, or when any panel
# query returns no series for that load (alert expressions may legitimately return none), except the
# panels in ALLOW_EMPTY below (each with the reason it may be empty; the script prints it).
#
# Environment: SYNCRELAY_BIN (binary), TANSU_BIN (tansu broker binary), KEEP_TMP=1 (keep the
# temporary folder and logs), OK_EVENTS (default 50), FAIL_EVENTS (default 3).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DASHBOARD="$ROOT/dashboards/syncrelay.json"
RULES="$ROOT/dashboards/alerts.yml"
SYNCRELAY_BIN="${SYNCRELAY_BIN:-$ROOT/target/debug/syncrelay}"
OK_EVENTS="${OK_EVENTS:-50}"
FAIL_EVENTS="${FAIL_EVENTS:-3}"
TANSU_BIN="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
TOKEN="t"

log() { printf '[check] %s\n' "$*" >&2; }
die() { printf '[check] FAIL: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- install Prometheus when missing
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root (or sudo) to run: $*"
    fi
}

install_prometheus() {
    log "installing Prometheus from Debian packages"
    # Keep the package's service from starting (we run our own process on our own port).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy"
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y --no-install-recommends prometheus; then
        as_root apt-get update
        as_root apt-get install -y --no-install-recommends prometheus
    fi
    if [ "$created_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
    # If a service got started anyway (e.g. a booted systemd), stop and disable it.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        as_root systemctl disable --now prometheus || true
    elif [ -x /etc/init.d/prometheus ]; then
        as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    install_prometheus
fi
command -v prometheus >/dev/null || die "prometheus not installed"
command -v promtool >/dev/null || die "promtool not installed"
command -v python3 >/dev/null || die "python3 is needed"
[ -x "$TANSU_BIN" ] || die "tansu not found at $TANSU_BIN (cargo install tansu, or set TANSU_BIN)"
log "$(prometheus --version 2>&1 | head -n1)"

# ---------------------------------------------------------------- promtool check rules
log "promtool check rules $RULES"
promtool check rules "$RULES" || die "promtool rejected $RULES"

# ---------------------------------------------------------------- the binary
if [ ! -x "$SYNCRELAY_BIN" ]; then
    if [ "$SYNCRELAY_BIN" = "$ROOT/target/debug/syncrelay" ]; then
        log "building syncrelay (cargo build --bin syncrelay)"
        (cd "$ROOT" && cargo build --bin syncrelay) || die "cargo build failed"
    else
        die "SYNCRELAY_BIN=$SYNCRELAY_BIN is not an executable"
    fi
fi

# ---------------------------------------------------------------- processes and cleanup
TMP="$(mktemp -d -t syncrelay-prom.XXXXXX)"
PIDS=()
STATUS=1
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$STATUS" -ne 0 ]; then
        for f in syncrelay.log prometheus.log receiver.log tansu.log; do
            if [ -s "$TMP/$f" ]; then
                printf '[check] ---- last lines of %s ----\n' "$f" >&2
                tail -n 40 "$TMP/$f" >&2
            fi
        done
    fi
    if [ "${KEEP_TMP:-0}" = "1" ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Wait until GET $1 answers 200 (timeout $2 seconds, process $3 must stay alive).
wait_http_ok() {
    local url="$1" timeout="$2" pid="$3"
    python3 - "$url" "$timeout" "$pid" <<'PY'
import os, sys, time, urllib.request
url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.time() + timeout
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"process {pid} exited while waiting for {url}")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"timed out waiting for {url}")
PY
}

RELAY_PORT="$(free_port)"
KAFKA_PORT="$(free_port)"
RECEIVER_PORT="$(free_port)"
PROM_PORT="$(free_port)"
RELAY="http://127.0.0.1:$RELAY_PORT"
PROM="http://127.0.0.1:$PROM_PORT"

# Receiver: 200 on /ok, 500 on /fail, 404 elsewhere.
cat > "$TMP/receiver.py" <<'PY'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        code = {"/ok": 200, "/fail": 500}.get(self.path.split("?")[0], 404)
        body = b'{"ok":true}' if code == 200 else b'{"error":"test receiver"}'
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST
    def log_message(self, fmt, *args):
        sys.stderr.write("receiver: " + (fmt % args) + "\n")

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
python3 "$TMP/receiver.py" "$RECEIVER_PORT" >"$TMP/receiver.log" 2>&1 &
PIDS+=($!)
RECEIVER_PID=$!

# Kafka broker: tansu with in-memory storage, in the temporary folder.
KAFKA_URL="tcp://127.0.0.1:$KAFKA_PORT"
log "starting tansu on $KAFKA_URL ($TANSU_BIN)"
(cd "$TMP" && RUST_LOG=warn exec "$TANSU_BIN" broker \
    --listener-url "$KAFKA_URL" --advertised-listener-url "$KAFKA_URL" \
    --storage-engine memory://tansu/ >"$TMP/tansu.log" 2>&1) &
PIDS+=($!)
TANSU_PID=$!
python3 - "$KAFKA_PORT" "$TANSU_PID" <<'PY' || die "tansu did not listen on $KAFKA_PORT"
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 30
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("tansu exited")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("timed out")
PY
for topic in sync_job_run.events sync_job_run.events.dlq sync_job_run.commands; do
    "$TANSU_BIN" topic create --broker "$KAFKA_URL" --partitions 2 "$topic" >>"$TMP/tansu.log" 2>&1 \
        || die "tansu topic create $topic failed"
done
log "topics created (2 partitions each)"

log "starting syncrelay on $RELAY ($SYNCRELAY_BIN), bus kafka on 127.0.0.1:$KAFKA_PORT"
SYNCRELAY__HTTP__LISTEN="127.0.0.1:$RELAY_PORT" \
SYNCRELAY__STORE__PATH="$TMP/s.db" \
SYNCRELAY__AUTH__TOKENS='["t"]' \
SYNCRELAY__DELIVERY__ALLOWED_CIDRS='["127.0.0.0/8"]' \
SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS=100 \
SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS=3 \
SYNCRELAY__BUS__KIND=kafka \
SYNCRELAY__BUS__KAFKA__LIBRDKAFKA="{\"bootstrap.servers\":\"127.0.0.1:$KAFKA_PORT\",\"session.timeout.ms\":6000,\"max.poll.interval.ms\":7000,\"heartbeat.interval.ms\":1000,\"statistics.interval.ms\":1000}" \
    "$SYNCRELAY_BIN" >"$TMP/syncrelay.log" 2>&1 &
PIDS+=($!)
RELAY_PID=$!

cat > "$TMP/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - "$RULES"
scrape_configs:
  - job_name: syncrelay
    scrape_interval: 1s
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$RELAY_PORT"]
YML
log "starting prometheus on $PROM"
prometheus \
    --config.file="$TMP/prometheus.yml" \
    --storage.tsdb.path="$TMP/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" \
    --log.level=warn \
    >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
PROM_PID=$!

wait_http_ok "http://127.0.0.1:$RECEIVER_PORT/ok" 20 "$RECEIVER_PID" || die "receiver did not start"
wait_http_ok "$RELAY/health/ready" 60 "$RELAY_PID" || die "syncrelay did not become ready"
wait_http_ok "$PROM/-/ready" 60 "$PROM_PID" || die "prometheus did not become ready"
log "waiting for the consumer group to assign partitions to syncrelay"
python3 - "$RELAY" "$RELAY_PID" <<'PY' || die "syncrelay was never assigned Kafka partitions"
import os, sys, time, urllib.request
relay, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 60
while time.time() < deadline:
    os.kill(pid, 0)
    with urllib.request.urlopen(relay + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("syncrelay_kafka_assigned_partitions ") and float(line.split()[1]) > 0:
                print(f"[check] {line}", file=sys.stderr)
                sys.exit(0)
    time.sleep(0.5)
sys.exit("syncrelay_kafka_assigned_partitions stayed 0 for 60s")
PY
log "all up; waiting for Prometheus's first scrapes of the idle relay"
# Prometheus starts scraping a few seconds after it is ready; the load must come after a baseline
# sample so that rate()/increase() see it.
python3 - "$PROM" <<'PY' || die "Prometheus never scraped syncrelay"
import json, sys, time, urllib.parse, urllib.request
prom = sys.argv[1]
q = urllib.parse.urlencode({"query": 'count_over_time(up{job="syncrelay"}[1m]) >= 3'})
deadline = time.time() + 60
while time.time() < deadline:
    with urllib.request.urlopen(f"{prom}/api/v1/query?{q}", timeout=5) as r:
        if json.load(r)["data"]["result"]:
            sys.exit(0)
    time.sleep(0.5)
sys.exit("no scrape of job syncrelay within 60s")
PY

# ---------------------------------------------------------------- load
log "sending load: $OK_EVENTS events to /ok, $FAIL_EVENTS to /fail"
python3 - "$RELAY" "$TOKEN" "http://127.0.0.1:$RECEIVER_PORT" "$OK_EVENTS" "$FAIL_EVENTS" <<'PY' || die "load failed"
import json, sys, time, urllib.error, urllib.request, uuid

relay, token, receiver, n_ok, n_fail = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def call(method, path, body=None, auth=True):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(relay + path, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if auth:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def must(status, body, what):
    if not 200 <= status < 300:
        sys.exit(f"{what}: HTTP {status} {body[:500]!r}")
    return json.loads(body) if body else None

ok = must(*call("POST", "/webhook", {"target_url": receiver + "/ok", "event_types": []}), "POST /webhook (ok)")
fail = must(*call("POST", "/webhook", {"target_url": receiver + "/fail", "event_types": []}), "POST /webhook (fail)")
print(f"webhooks: ok={ok['id']} fail={fail['id']}", file=sys.stderr)

def event(eid, webhook_id, run_id):
    return {"id": eid, "event": "sync_job_run:record", "webhook_id": webhook_id,
            "sync_job_run_id": run_id, "payload": {"n": eid}}

tag = uuid.uuid4().hex[:8]
ok_runs = [str(uuid.uuid4()) for _ in range(5)]
events = [event(f"ok-{tag}-{i}", ok["id"], ok_runs[i % len(ok_runs)]) for i in range(n_ok)]
batches = [events[i:i + 10] for i in range(0, len(events), 10)]
for i, batch in enumerate(batches):
    must(*call("POST", "/events", {"events": batch}), "POST /events (ok)")
    if i == 0:
        # Failing events early, each in its own run so they retry in parallel.
        fails = [event(f"fail-{tag}-{j}", fail["id"], str(uuid.uuid4())) for j in range(n_fail)]
        must(*call("POST", "/events", {"events": fails}), "POST /events (fail)")
    time.sleep(0.5)

# One sync job run through its lifecycle (events naming only the run), so the runs panels see a
# run reach "completed".
job = must(*call("POST", "/sync-job", {"integration_name": "jira",
                                       "resources": [{"resource": "ticketing/tickets", "method": "list"}]}),
           "POST /sync-job")
run = must(*call("POST", "/sync-job-run", {"sync_job_id": job["id"],
                                           "integrated_account_id": "94801e49-a652-42f9-af14-dd203d7897da",
                                           "webhook_id": ok["id"], "error_handling": "ignore"}),
           "POST /sync-job-run")
def run_event(eid, kind, payload):
    return {"id": eid, "event": f"sync_job_run:{kind}", "sync_job_run_id": run["id"], "payload": payload}
must(*call("POST", "/events", {"events": [
    run_event(f"run-{tag}-started", "started", {}),
    run_event(f"run-{tag}-record", "record", {"resource": "ticketing/tickets", "n": 1}),
    run_event(f"run-{tag}-completed", "completed", {}),
]}), "POST /events (run)")
print(f"sync job run: {run['id']}", file=sys.stderr)

# A few more API series: a list (2xx) and an unauthenticated call (4xx).
call("GET", "/webhook")
call("GET", "/webhook", auth=False)

# Wait until the relay reports every delivery terminal and the run completed.
def counters():
    status, body = call("GET", "/metrics", auth=False)
    got = {"delivered": 0.0, "dead_lettered": 0.0, "runs_completed": 0.0}
    for line in body.decode().splitlines():
        if line.startswith("syncrelay_deliveries_total{"):
            for outcome in ("delivered", "dead_lettered"):
                if f'outcome="{outcome}"' in line:
                    got[outcome] += float(line.rsplit(" ", 1)[1])
        elif line.startswith('syncrelay_runs_total{status="completed"}'):
            got["runs_completed"] = float(line.rsplit(" ", 1)[1])
    return got

deadline = time.time() + 90
while True:
    got = counters()
    if got["delivered"] >= n_ok and got["dead_lettered"] >= n_fail and got["runs_completed"] >= 1:
        break
    if time.time() > deadline:
        print(f"WARNING: deliveries not all terminal after 90s: {got}", file=sys.stderr)
        break
    time.sleep(0.5)
print(f"relay counters: {got}", file=sys.stderr)
PY

log "waiting for Prometheus to scrape the load"
sleep 5

# ---------------------------------------------------------------- evaluate every query
python3 - "$PROM" "$DASHBOARD" "$RULES" <<'PY'
import json, re, sys, urllib.error, urllib.parse, urllib.request

prom, dashboard_path, rules_path = sys.argv[1], sys.argv[2], sys.argv[3]

# Grafana variables -> the values a Grafana user would see for this setup.
SUBST = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600",
         "__interval_ms": "15000", "job": "syncrelay", "instance": ".*"}

def substitute(expr):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        name = name.split(":")[0]
        if name not in SUBST:
            raise SystemExit(f"unknown dashboard variable ${name} in: {expr}")
        return SUBST[name]
    return re.sub(r"\$\{(\w+(?::\w+)?)\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)

def get(path, **params):
    url = prom + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": f"HTTP {e.code}"}

def query(expr):
    res = get("/api/v1/query", query=expr)
    if res.get("status") != "success":
        return None, res.get("error", "unknown error")
    data = res["data"]
    if data["resultType"] in ("vector", "matrix"):
        return len(data["result"]), None
    return 1, None  # scalar / string

# Panels whose query may return no series under this load, with the reason (keep this short).
# Empty today: every labelled syncrelay series with fixed label values is created at start with
# value 0 (rebalances, paused partitions, dropped run events, ...), so even the counters this load
# does not move return series; add a panel title here only with a reason it is printed with.
ALLOW_EMPTY = {
}

def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))

failures = 0
n_panel = n_alert = 0
dashboard = json.load(open(dashboard_path))
for p in panels(dashboard.get("panels", [])):
    for t in p.get("targets", []):
        expr = substitute(t["expr"])
        n, err = query(expr)
        n_panel += 1
        if err:
            failures += 1
            print(f'panel "{p.get("title")}" refId={t.get("refId")} ERROR={err} expr={expr}')
        else:
            mark = ""
            if n == 0 and p.get("title") in ALLOW_EMPTY:
                mark = f"   (no data allowed: {ALLOW_EMPTY[p.get('title')]})"
            elif n == 0:
                mark = "   <-- NO DATA"
                failures += 1
            print(f'panel "{p.get("title")}" refId={t.get("refId")} series={n} expr={expr}{mark}')

# Alert expressions as Prometheus loaded them from alerts.yml.
expected_alerts = len(re.findall(r"^\s*-\s*alert:", open(rules_path).read(), re.M))
rules = get("/api/v1/rules")
if rules.get("status") != "success":
    sys.exit(f"GET /api/v1/rules failed: {rules}")
alerts = [r for g in rules["data"]["groups"] for r in g["rules"] if r.get("type") == "alerting"]
if len(alerts) != expected_alerts:
    failures += 1
    print(f"ERROR: Prometheus loaded {len(alerts)} alerting rules, {rules_path} has {expected_alerts}")
for r in alerts:
    expr = " ".join(r["query"].split())
    n, err = query(r["query"])
    n_alert += 1
    if err:
        failures += 1
        print(f"alert {r['name']} ERROR={err} expr={expr}")
    else:
        health = r.get("health", "unknown")
        if health == "err":
            failures += 1
        print(f"alert {r['name']} series={n} health={health} state={r.get('state')} expr={expr}")

print(f"prometheus: {n_panel} panel queries, {n_alert} alert expressions, {failures} failed")
sys.exit(1 if failures else 0)
PY
STATUS=$?
exit "$STATUS"
