#!/usr/bin/env bash
# gateway-bench.sh - compare direct TCP, a strait gateway pair, an HAProxy mTLS
# gateway pair and (RELAY=1) the same HAProxy pair without TLS side by side, on
# loopback only (127.0.0.1).
#
#   client -> nginx / iperf3                                  (direct)
#   client -> strait B (import) =QUIC mTLS=> strait A (export) -> backend
#   client -> haproxy B (tcp)   =TLS 1.3 mTLS=> haproxy A     -> backend
#   client -> relay B (haproxy) =plain TCP=>    relay A       -> backend   (RELAY=1)
#
# Usage: bash bench/gateway-bench.sh      (see bench/README.md for env vars)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

DURATION=${DURATION:-10}          # seconds per measured load (wrk and iperf3)
DURATION=${DURATION%s}
WARMUP=${WARMUP:-1}               # seconds of keep-alive wrk before measuring, 0 = none
WARMUP=${WARMUP%s}
THREADS=${THREADS:-2}             # strait STRAIT_WORKER_THREADS == haproxy nbthread
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-16}
NGINX_WORKERS=${NGINX_WORKERS:-1}
PIN=${PIN:-0}                     # 1 = pin load generators / servers with taskset
SKIP_STRAIT=${SKIP_STRAIT:-0}     # 1 = no strait column (no cargo build)
RELAY=${RELAY:-1}                 # 1 = also an HAProxy pair without TLS: what two relay hops cost
IDLE_CONNS=${IDLE_CONNS:-1000}    # idle proxied connections held for the memory-per-connection figure
IDLE_STEADY=${IDLE_STEADY:-11}    # seconds after the first idle sample for the steady one
PROFILE=${PROFILE:-0}             # 1 = perf record both strait gateways during each load
STRAIT_BIN=${STRAIT_BIN:-}        # use this binary instead of building
STRAIT_TUNNEL=${STRAIT_TUNNEL:-}  # extra `tunnel:` settings for both strait gateways, "key: value; ..."
READY_TIMEOUT=${READY_TIMEOUT:-10}
OUT_DIR=${OUT_DIR:-$SCRIPT_DIR/out}
BODY_PATH=/1k.bin

WORK=""
PIDS=()
SAMPLER_PID=""
CLIENT_PID=""
LAST_PID=""
STRAIT=""
PKI_TOOL=""
declare -A R=()                   # results: R[setup:metric]
declare -A STOPPED=()             # pids already stopped and reaped
RUN_STRAIT=0                      # 1 = measure the strait column
SERVER_PREFIX=()                  # taskset prefix for backends + gateways
CLIENT_PREFIX=()                  # taskset prefix for wrk / iperf3 client
PIN_NOTE="no CPU pinning (default; set PIN=1 to pin)"

# ---------------------------------------------------------------- helpers --
log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_num() { [[ ${1:-} =~ ^[0-9]+([.][0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }

# alive PID: true if the process exists and is not a zombie.
alive() {
  local s
  [[ -r /proc/$1/stat ]] || return 1
  s=$(<"/proc/$1/stat") 2>/dev/null || return 1
  s=${s##*) }
  [[ ${s%% *} != Z ]]
}

# start_bg NAME CMD...: start CMD in its own process group (setsid, no fork),
# log to $WORK/logs/NAME.log, remember the pid for cleanup; sets LAST_PID.
start_bg() {
  local name=$1; shift
  setsid "${SERVER_PREFIX[@]}" "$@" >"$WORK/logs/$name.log" 2>&1 </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# stop_proc PID: TERM the process group, wait up to 3 s, then KILL it.
stop_proc() {
  local pid=$1 i
  [[ -z ${STOPPED[$pid]:-} ]] || return 0
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do alive "$pid" || break; sleep 0.1; done
  fi
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  STOPPED[$pid]=1 # reaped: the pid may be reused, never signal it again
}

stop_sampler() {
  if [[ -n $SAMPLER_PID ]]; then
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
  fi
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  if [[ -n $CLIENT_PID ]]; then # timeout forwards TERM to wrk / iperf3
    kill -TERM "$CLIENT_PID" 2>/dev/null || true
    wait "$CLIENT_PID" 2>/dev/null || true
  fi
  stop_sampler
  for pid in "${PIDS[@]}"; do stop_proc "$pid"; done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "KEEP_WORK=1: left $WORK"; else rm -rf -- "$WORK"; fi
  fi
  exit "$rc"
}

dump_log() { # dump_log NAME: tail of every $WORK/logs/NAME*.log
  local f
  for f in "$WORK/logs/$1"*.log; do
    [[ -s $f ]] || continue
    log "---- last lines of ${f##*/} ----"
    tail -n 30 "$f" >&2 || true
  done
}

tcp_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# wait_until NAME PID CMD...: poll CMD every 100 ms for up to READY_TIMEOUT s,
# failing early (with the log) if the process PID dies.
wait_until() {
  local name=$1 pid=$2; shift 2
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@"; do
    if [[ $pid != - ]] && ! alive "$pid"; then
      dump_log "$name"; die "$name exited during startup"
    fi
    if ((SECONDS >= deadline)); then
      dump_log "$name"; die "$name not ready after ${READY_TIMEOUT}s ($*)"
    fi
    sleep 0.1
  done
}

http_ok() { curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; }

# body_ok URL: GET returns 200 and exactly the 1 KiB body.
body_ok() {
  local n
  n=$(curl -fsS --max-time 2 -o /dev/null -w '%{size_download}' "$1" 2>/dev/null) || return 1
  [[ $n == 1024 ]]
}

rss_kb() { # rss_kb PID [FIELD] -> VmRSS (or FIELD, e.g. RssAnon) in KiB on stdout
  local k v _ field=${2:-VmRSS}
  while read -r k v _; do
    if [[ $k == "$field:" ]]; then echo "$v"; return 0; fi
  done <"/proc/$1/status"
  return 1
}

cpu_ticks() { # cpu_ticks PID -> utime+stime (all threads) in clock ticks
  local s fields
  s=$(<"/proc/$1/stat")
  s=${s##*) }
  read -r -a fields <<<"$s"
  echo $((fields[11] + fields[12]))
}

# start_sampler OUT NAME=PID...: every 200 ms append "NAME VmRSS_KiB" lines.
start_sampler() {
  local out=$1; shift
  (
    set +e
    while :; do
      for np in "$@"; do
        v=$(rss_kb "${np#*=}" 2>/dev/null) && echo "${np%%=*} $v"
      done
      sleep 0.2
    done
  ) >"$out" 2>/dev/null &
  SAMPLER_PID=$!
}

peak_kb() { # peak_kb FILE NAME
  awk -v n="$2" '$1 == n && $2 > m { m = $2 } END { print (m == "" ? "NA" : m) }' "$1"
}

# ------------------------------------------------------------------ setup --
ensure_tools() {
  local c missing=()
  for c in haproxy nginx wrk iperf3; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  command -v curl >/dev/null || missing+=(curl)
  if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]} and not root; install them first"
    log "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx wrk iperf3 curl >&2
  fi
  for c in python3 openssl setsid timeout awk; do
    command -v "$c" >/dev/null || die "required command not found: $c"
  done
}

validate_env() {
  [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be whole seconds (got '$DURATION')"
  [[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds (got '$WARMUP')"
  [[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer"
  [[ $WRK_THREADS =~ ^[1-9][0-9]*$ && $WRK_CONNS =~ ^[1-9][0-9]*$ ]] ||
    die "WRK_THREADS / WRK_CONNS must be positive integers"
  ((WRK_CONNS >= WRK_THREADS)) || die "WRK_CONNS must be >= WRK_THREADS"
  [[ $IDLE_CONNS =~ ^[0-9]+$ ]] || die "IDLE_CONNS must be a whole number (got '$IDLE_CONNS')"
  [[ $IDLE_STEADY =~ ^[0-9]+$ ]] || die "IDLE_STEADY must be a whole number of seconds (got '$IDLE_STEADY')"
  [[ $PROFILE =~ ^[01]$ ]] || die "PROFILE must be 0 or 1 (got '$PROFILE')"
  [[ $RELAY =~ ^[01]$ ]] || die "RELAY must be 0 or 1 (got '$RELAY')"
}

setup_pinning() {
  local ncpu
  ncpu=$(nproc)
  [[ $PIN == 1 ]] || return 0
  if ! command -v taskset >/dev/null; then
    PIN_NOTE="PIN=1 requested but taskset not found: no pinning"
  elif ((ncpu < 2)); then
    PIN_NOTE="PIN=1 requested but only 1 CPU: no pinning"
  else
    CLIENT_CPUS=${CLIENT_CPUS:-$((ncpu - 1))}
    if ((ncpu == 2)); then SERVER_CPUS=${SERVER_CPUS:-0}; else SERVER_CPUS=${SERVER_CPUS:-0-$((ncpu - 2))}; fi
    SERVER_PREFIX=(taskset -c "$SERVER_CPUS")
    CLIENT_PREFIX=(taskset -c "$CLIENT_CPUS")
    PIN_NOTE="PIN=1: wrk/iperf3 client on CPU(s) $CLIENT_CPUS; nginx, iperf3 server and all gateways on CPU(s) $SERVER_CPUS"
  fi
  log "$PIN_NOTE"
}

ensure_strait() {
  if [[ -n $STRAIT_BIN ]]; then
    [[ -x $STRAIT_BIN ]] || die "STRAIT_BIN=$STRAIT_BIN is not executable"
    STRAIT=$STRAIT_BIN
  elif [[ $SKIP_STRAIT != 1 ]]; then
    log "building strait: cargo build --release -p strait-gateway"
    (cd "$REPO_ROOT" && cargo build --release -p strait-gateway) >&2
    local tdir=${CARGO_TARGET_DIR:-target}
    [[ $tdir == /* ]] || tdir=$REPO_ROOT/$tdir
    STRAIT=$tdir/release/strait
    [[ -x $STRAIT ]] || die "build finished but $STRAIT not found"
  fi
  if [[ -n $STRAIT ]]; then PKI_TOOL=strait; else PKI_TOOL=openssl; fi
  if [[ -n $STRAIT && $SKIP_STRAIT != 1 ]]; then RUN_STRAIT=1; fi
}

# openssl_leaf ID: ECDSA P-256 leaf for cluster ID signed by the test CA.
openssl_leaf() {
  local id=$1 ca=$WORK/ca pki=$WORK/pki
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$id.key" -subj "/O=strait-bench/CN=$id" -out "$pki/$id.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=URI:spiffe://bench.strait/cluster/$id,DNS:$id" >"$pki/$id.ext"
  openssl x509 -req -in "$pki/$id.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" \
    -CAcreateserial -days 2 -sha256 -extfile "$pki/$id.ext" -out "$pki/$id.pem" 2>/dev/null
}

# setup_pki: CA in $WORK/ca, leaf certs + ca.pem copy in $WORK/pki.
# Uses `strait pki` whenever a strait binary is available; the openssl path
# exists only so SKIP_STRAIT=1 runs work without strait.
setup_pki() {
  local id ids=(haproxy-a haproxy-b)
  mkdir -p "$WORK/ca" "$WORK/pki"
  if [[ $PKI_TOOL == strait ]]; then
    ids+=(bench-a bench-b)
    "$STRAIT" pki init --dir "$WORK/ca" --trust-domain bench.strait >&2
    for id in "${ids[@]}"; do
      "$STRAIT" pki issue --ca "$WORK/ca" --cluster "$id" --out "$WORK/pki" >&2
    done
  else
    log "no strait binary: generating an openssl test PKI (ECDSA P-256)"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$WORK/ca/ca.key" -out "$WORK/ca/ca.pem" -days 2 \
      -subj "/O=strait-bench/CN=bench test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    for id in "${ids[@]}"; do openssl_leaf "$id"; done
  fi
  cp "$WORK/ca/ca.pem" "$WORK/pki/ca.pem"
  for id in "${ids[@]}"; do
    [[ -s $WORK/pki/$id.pem && -s $WORK/pki/$id.key ]] || die "PKI: missing $id.pem/$id.key"
  done
  for id in haproxy-a haproxy-b; do # haproxy `crt` wants cert + key in one file
    cat "$WORK/pki/$id.pem" "$WORK/pki/$id.key" >"$WORK/pki/$id.bundle.pem"
  done
}

# --------------------------------------------------------------- backends --
start_nginx() {
  local d=$WORK/nginx
  mkdir -p "$d/www" "$d/tmp"
  head -c 1024 /dev/zero | tr '\0' 'x' >"$d/www${BODY_PATH}"
  {
    ((EUID == 0)) && echo "user root;  # workdir is 0700; workers must read it"
    cat <<EOF
worker_processes $NGINX_WORKERS;
pid $d/nginx.pid;
error_log $WORK/logs/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    open_file_cache max=16;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    server {
        listen 127.0.0.1:$P_NGINX;
        root $d/www;
    }
}
EOF
  } >"$d/nginx.conf"
  start_bg nginx nginx -p "$d" -e "$WORK/logs/nginx-error.log" -c "$d/nginx.conf" -g 'daemon off;'
  wait_until nginx "$LAST_PID" tcp_open "$P_NGINX"
  body_ok "http://127.0.0.1:$P_NGINX$BODY_PATH" || die "nginx does not serve the 1 KiB body"
}

start_iperf_server() {
  start_bg iperf3-server iperf3 -s -B 127.0.0.1 -p "$P_IPERF"
  wait_until iperf3-server "$LAST_PID" tcp_open "$P_IPERF"
}

# ------------------------------------------------------------------ strait --
# shellcheck source=pair-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/pair-lib.sh" # free_ports, tunnel_yaml

write_strait_configs() {
  cat >"$WORK/pki/bench-a.yaml" <<EOF
cluster: bench-a
region: bench
zone: ""
trust_domain: bench.strait
listen:
  tunnel: 127.0.0.1:$P_SA_TUNNEL
  admin: 127.0.0.1:$P_SA_ADMIN
tls:
  ca: ca.pem
  cert: bench-a.pem
  key: bench-a.key
$(tunnel_yaml)
exports:
  - name: nginx
    namespace: bench
    ports: [{name: http, port: 80, target_port: $P_NGINX}]
    endpoints: [{address: 127.0.0.1}]
  - name: iperf
    namespace: bench
    ports: [{name: iperf, port: 5201, target_port: $P_IPERF}]
    endpoints: [{address: 127.0.0.1}]
EOF
  cat >"$WORK/pki/bench-b.yaml" <<EOF
cluster: bench-b
region: bench
zone: ""
trust_domain: bench.strait
listen:
  tunnel: 127.0.0.1:$P_SB_TUNNEL
  admin: 127.0.0.1:$P_SB_ADMIN
tls:
  ca: ca.pem
  cert: bench-b.pem
  key: bench-b.key
$(tunnel_yaml)
peers:
  - cluster: bench-a
    address: 127.0.0.1:$P_SA_TUNNEL
imports:
  - name: nginx
    namespace: bench
    address: 127.0.0.1
    ports: [{name: http, port: 80, listen_port: $P_SB_NGINX}]
    clusters: [bench-a]
  - name: iperf
    namespace: bench
    address: 127.0.0.1
    ports: [{name: iperf, port: 5201, listen_port: $P_SB_IPERF}]
    clusters: [bench-a]
EOF
}

start_strait() { # start_strait NAME CONFIG ADMIN_PORT; sets LAST_PID
  local name=$1 cfg=$2 admin=$3
  start_bg "$name" env STRAIT_WORKER_THREADS="$THREADS" RUST_LOG="${RUST_LOG:-warn}" \
    "$STRAIT" run --config "$cfg"
  wait_until "$name" "$LAST_PID" http_ok "http://127.0.0.1:$admin/ready"
}

# ----------------------------------------------------------------- haproxy --
haproxy_global() { # haproxy_global STATS_SOCKET
  cat <<EOF
global
    nbthread $THREADS
    maxconn 4000
    stats socket $1 mode 600 level admin
    # TLS 1.3 only; tune.ssl.cachesize left at its default (20000 sessions);
    # session resumption is allowed (HAProxy default: server-side reuse on,
    # TLS tickets on) - what a real deployment would run.
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client $((DURATION + 30))s
    timeout server $((DURATION + 30))s

EOF
}

# write_haproxy_configs NAME TLS PA_NGINX PA_IPERF PB_NGINX PB_IPERF: the pair's configs as
# $WORK/NAME-{a,b}.cfg; TLS=1 puts mTLS between the two, TLS=0 plain TCP (the relay column).
write_haproxy_configs() {
  local name=$1 tls=$2 pa_nginx=$3 pa_iperf=$4 pb_nginx=$5 pb_iperf=$6 pki=$WORK/pki
  local bind_tls="" server_tls="" what="plain TCP, no TLS (the relay column)"
  if ((tls)); then
    bind_tls=" ssl crt $pki/haproxy-a.bundle.pem ca-file $pki/ca.pem verify required"
    server_tls=" ssl crt $pki/haproxy-b.bundle.pem ca-file $pki/ca.pem verify required"
    what="TLS 1.3, client certificate required (mTLS)"
  fi
  {
    haproxy_global "$WORK/$name-a.sock"
    cat <<EOF
# exporter side: $what
frontend a_nginx
    bind 127.0.0.1:$pa_nginx$bind_tls
    default_backend nginx
frontend a_iperf
    bind 127.0.0.1:$pa_iperf$bind_tls
    default_backend iperf
backend nginx
    server nginx 127.0.0.1:$P_NGINX
backend iperf
    server iperf 127.0.0.1:$P_IPERF
EOF
  } >"$WORK/$name-a.cfg"
  {
    haproxy_global "$WORK/$name-b.sock"
    cat <<EOF
# importer side: plain TCP in; out: $what
frontend b_nginx
    bind 127.0.0.1:$pb_nginx
    default_backend to_a_nginx
frontend b_iperf
    bind 127.0.0.1:$pb_iperf
    default_backend to_a_iperf
backend to_a_nginx
    server a 127.0.0.1:$pa_nginx$server_tls
backend to_a_iperf
    server a 127.0.0.1:$pa_iperf$server_tls
EOF
  } >"$WORK/$name-b.cfg"
}

start_haproxy() { # start_haproxy NAME CONFIG PORT; -db: foreground, no master-worker
  local name=$1 cfg=$2 port=$3
  haproxy -c -q -f "$cfg" >&2 || die "haproxy config check failed: $cfg"
  start_bg "$name" haproxy -db -f "$cfg"
  wait_until "$name" "$LAST_PID" tcp_open "$port"
}

# haproxy_tls_stats SOCKET -> "full resumed": TLS handshakes summed over all
# FRONTEND rows of `show stat` (ssl_sess counts full handshakes only,
# ssl_reused_sess the resumed ones; both cumulative).
haproxy_tls_stats() {
  python3 - "$1" <<'EOF'
import csv, io, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"show stat\n"); buf = b""
while True:
    d = s.recv(65536)
    if not d: break
    buf += d
rows = [r for r in csv.DictReader(io.StringIO(buf.decode().lstrip("# ")))
        if r["svname"] == "FRONTEND"]
print(sum(int(r.get("ssl_sess") or 0) for r in rows),
      sum(int(r.get("ssl_reused_sess") or 0) for r in rows))
EOF
}

# ---------------------------------------------------------- measurements --
# run_client CMD...: run a load generator (pinned if PIN=1) with a hard time
# limit. It runs in the background and we `wait` for it, so Ctrl-C interrupts
# the wait at once and the EXIT trap stops it (a foreground child that exits
# normally after SIGINT would make bash skip the INT trap).
run_client() {
  local rc=0
  "${CLIENT_PREFIX[@]}" timeout $((DURATION + 30)) "$@" &
  CLIENT_PID=$!
  wait "$CLIENT_PID" || rc=$?
  CLIENT_PID=""
  return "$rc"
}

# parse_wrk FILE -> "rps p50_ms p99_ms socket_errors non2xx"
parse_wrk() {
  awk '
    function ms(v,  n, u) { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
      if (u == "us") return n / 1000; if (u == "s") return n * 1000
      if (u == "m") return n * 60000; return n }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(/,/, ""); err = $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { bad = $5 }
    END { printf "%s %s %s %d %d\n", (rps == "" ? "NA" : rps), (p50 == "" ? "NA" : p50),
          (p99 == "" ? "NA" : p99), err, bad }' "$1"
}

# GATEWAYS: the ROLE=PID list of the setup being measured (empty for direct).
GATEWAYS=()

gateway_ticks() { # gateway_ticks -> utime+stime of every live gateway in GATEWAYS
  local np t=0
  for np in "${GATEWAYS[@]}"; do
    if alive "${np#*=}"; then t=$((t + $(cpu_ticks "${np#*=}"))); fi
  done
  echo "$t"
}

# measured SETUP KIND OUT CMD...: runs a load (its output to OUT), recording the gateways'
# CPU seconds over it in R[SETUP:KIND.cpu] and, with PROFILE=1 for strait, a perf profile
# of both gateways (which slows them: figures from such a run are not comparable).
measured() {
  local setup=$1 kind=$2 out=$3; shift 3
  local t0 perf_pid="" pids np rc=0
  t0=$(gateway_ticks)
  if ((PROFILE)) && [[ $setup == strait ]] && ((${#GATEWAYS[@]})); then
    pids=$(for np in "${GATEWAYS[@]}"; do printf '%s,' "${np#*=}"; done)
    mkdir -p "$OUT_DIR"
    perf record -q -e cpu-clock -F 999 -g -p "${pids%,}" -o "$OUT_DIR/perf-$kind.data" \
      -- sleep "$DURATION" >/dev/null 2>&1 &
    perf_pid=$!
    PIDS+=("$perf_pid")
  fi
  "$@" >"$out" 2>&1 || rc=$?
  if [[ -n $perf_pid ]]; then
    wait "$perf_pid" || true
    perf report -i "$OUT_DIR/perf-$kind.data" --no-children -g none --sort dso,symbol --stdio \
      2>/dev/null | grep -E '^ +[0-9]' | sed -E 's/( +-)* *$//' | head -n 40 >"$OUT_DIR/perf-$kind.txt" || true
    if [[ -s $OUT_DIR/perf-$kind.txt ]]; then
      log "$setup: profile of the $kind load in $OUT_DIR/perf-$kind.txt"
    else
      log "$setup: no profile of the $kind load (is perf installed and allowed?)"
    fi
  fi
  ((${#GATEWAYS[@]} == 0)) ||
    R[$setup:$kind.cpu]=$(awk -v t="$(($(gateway_ticks) - t0))" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "%.2f", t / hz }')
  return "$rc"
}

run_wrk() { # run_wrk SETUP KIND URL [wrk args...]
  local setup=$1 kind=$2 url=$3; shift 3
  local f=$WORK/results/$setup-$kind.wrk rps p50 p99 err bad
  log "$setup: wrk $kind ${DURATION}s -t$WRK_THREADS -c$WRK_CONNS $*"
  measured "$setup" "$kind" "$f" run_client wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DURATION}s" \
    --latency "$@" "$url" || log "$setup: wrk $kind exited non-zero (see below)"
  R[$setup:$kind.requests]=$(awk '/requests in/ { print $1; exit }' "$f")
  read -r rps p50 p99 err bad < <(parse_wrk "$f")
  [[ $rps != NA ]] || { log "$setup: wrk $kind produced no result:"; tail -n 20 "$f" >&2; }
  R[$setup:$kind.rps]=$rps; R[$setup:$kind.p50]=$p50; R[$setup:$kind.p99]=$p99
  R[$setup:$kind.err]=$err; R[$setup:$kind.non2xx]=$bad
}

run_iperf() { # run_iperf SETUP PORT
  local setup=$1 port=$2 f=$WORK/results/$1.iperf.json
  log "$setup: iperf3 ${DURATION}s single stream"
  measured "$setup" iperf "$f" run_client iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" -J ||
    log "$setup: iperf3 exited non-zero"
  local bps bytes
  read -r bps bytes < <(python3 - "$f" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["end"]["sum_received"]
    print(r["bits_per_second"], r["bytes"])
except Exception:
    print("NA NA")
EOF
)
  R[$setup:iperf.bps]=$bps; R[$setup:iperf.bytes]=$bytes
  [[ ${R[$setup:iperf.bps]} != NA ]] || { log "$setup: iperf3 failed:"; tail -n 20 "$f" >&2; }
}

# idle_conns SETUP HTTP_PORT ROLE=PID...: holds IDLE_CONNS proxied connections open, each
# after one full request and answer, and records each gateway's growth of anonymous
# memory (RssAnon: heap, stacks; what connection state lives in) per held connection
# (KiB) in R[SETUP:per_conn.ROLE]. Not VmRSS: that also counts code pages, which strait
# unmaps every 10 s when unused. Bounded: the holder gives up after 120 s.
idle_conns() {
  local setup=$1 port=$2 np; shift 2
  local -A before=()
  ((IDLE_CONNS > 0)) || return 0
  for np in "$@"; do before[${np%%=*}]=$(rss_kb "${np#*=}" RssAnon || echo NA); done
  log "$setup: holding $IDLE_CONNS idle proxied connections"
  local flag=$WORK/results/$setup.held
  rm -f "$flag"
  "${CLIENT_PREFIX[@]}" python3 - "$port" "$IDLE_CONNS" "$BODY_PATH" "$flag" <<'EOF' &
import socket, sys, time
port, n, path, flag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(req)
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed early")
        got += chunk
    socks.append(s)
open(flag, "w").write("held\n")
time.sleep(120)
EOF
  local holder=$!
  PIDS+=("$holder")
  local deadline=$((SECONDS + 60))
  while [[ ! -s $flag ]] && alive "$holder" && ((SECONDS < deadline)); do sleep 0.2; done
  if [[ -s $flag ]]; then
    sleep 1 # settle
    local after
    for np in "$@"; do
      after=$(rss_kb "${np#*=}" RssAnon || echo NA)
      is_num "$after" && is_num "${before[${np%%=*}]}" || continue
      R[$setup:per_conn.${np%%=*}]=$(awk -v a="$after" -v b="${before[${np%%=*}]}" \
        -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')
    done
  else
    log "$setup: could not hold $IDLE_CONNS connections"
  fi
  kill "$holder" 2>/dev/null || true
  wait "$holder" 2>/dev/null || true
}

# bench_setup SETUP HTTP_PORT IPERF_PORT [ROLE=PID...]: smoke check, idle RSS,
# then the three loads with RSS sampling and CPU accounting for the gateways.
bench_setup() {
  local setup=$1 hport=$2 iport=$3; shift 3
  local url="http://127.0.0.1:$hport$BODY_PATH" np role pid
  local -A cpu0=()
  wait_until "$setup" - body_ok "$url" # on failure dumps $setup*.log
  sleep 1 # let post-handshake bookkeeping settle before the idle sample
  for np in "$@"; do
    role=${np%%=*}; pid=${np#*=}
    R[$setup:rss_idle.$role]=$(rss_kb "$pid" || echo NA)
  done
  # Steady idle: past strait's periodic memory pass (every 10 s), which returns freed heap
  # and unmaps code that start-up ran; RSS rises between passes as idle work touches code,
  # so the figure is the highest of one sample a second over the next 10 s.
  sleep "$IDLE_STEADY"
  local i kb top
  for i in $(seq 10); do
    for np in "$@"; do
      role=${np%%=*}; pid=${np#*=}
      kb=$(rss_kb "$pid" || echo NA)
      top=${R[$setup:rss_steady.$role]:-}
      if [[ -z $top ]] || { is_num "$kb" && { ! is_num "$top" || ((kb > top)); }; }; then
        R[$setup:rss_steady.$role]=$kb
      fi
    done
    sleep 1
  done
  GATEWAYS=("$@")
  (($# == 0)) || idle_conns "$setup" "$hport" "$@"
  # CPU over the loads only (not the idle connections' set-up and teardown).
  for np in "$@"; do
    role=${np%%=*}; pid=${np#*=}
    cpu0[$role]=$(cpu_ticks "$pid")
  done
  (($# == 0)) || start_sampler "$WORK/results/$setup.rss" "$@"
  if ((WARMUP > 0)); then
    run_client wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
  fi
  run_wrk "$setup" ka "$url"
  run_wrk "$setup" nc "$url" -H 'Connection: close'
  run_iperf "$setup" "$iport"
  stop_sampler
  local hz total=0
  hz=$(getconf CLK_TCK)
  for np in "$@"; do
    role=${np%%=*}; pid=${np#*=}
    alive "$pid" || log "WARNING: $setup gateway $role died during the run"
    R[$setup:rss_peak.$role]=$(peak_kb "$WORK/results/$setup.rss" "$role")
    if alive "$pid"; then total=$((total + $(cpu_ticks "$pid") - ${cpu0[$role]})); fi
  done
  (($# == 0)) || R[$setup:cpu_s]=$(awk -v t="$total" -v hz="$hz" 'BEGIN { printf "%.1f", t / hz }')
}

bench_direct() {
  bench_setup direct "$P_NGINX" "$P_IPERF"
}

bench_strait() {
  if ((!RUN_STRAIT)); then log "strait: skipped (SKIP_STRAIT=1)"; return 0; fi
  write_strait_configs
  local a b
  start_strait strait-a "$WORK/pki/bench-a.yaml" "$P_SA_ADMIN"; a=$LAST_PID
  start_strait strait-b "$WORK/pki/bench-b.yaml" "$P_SB_ADMIN"; b=$LAST_PID
  wait_until strait-b "$b" tcp_open "$P_SB_NGINX"
  wait_until strait-b "$b" tcp_open "$P_SB_IPERF"
  R[strait:version]=$("$STRAIT" --version 2>/dev/null | head -n1 || true)
  bench_setup strait "$P_SB_NGINX" "$P_SB_IPERF" A="$a" B="$b"
  stop_proc "$b"; stop_proc "$a"
}

bench_haproxy() {
  write_haproxy_configs haproxy 1 "$P_HA_NGINX" "$P_HA_IPERF" "$P_HB_NGINX" "$P_HB_IPERF"
  local a b full reused
  start_haproxy haproxy-a "$WORK/haproxy-a.cfg" "$P_HA_NGINX"; a=$LAST_PID
  start_haproxy haproxy-b "$WORK/haproxy-b.cfg" "$P_HB_NGINX"; b=$LAST_PID
  bench_setup haproxy "$P_HB_NGINX" "$P_HB_IPERF" A="$a" B="$b"
  read -r full reused < <(haproxy_tls_stats "$WORK/haproxy-a.sock" 2>/dev/null || echo "n/a n/a")
  R[haproxy:tls_full]=$full; R[haproxy:tls_reused]=$reused
  stop_proc "$b"; stop_proc "$a"
}

# The relay column: the same HAProxy pair without TLS, i.e. two plain TCP relay hops. It
# is not a target; it shows what any two-gateway path costs on this machine before
# encryption (a bound for the new-connection ratio against direct TCP).
bench_relay() {
  ((RELAY)) || return 0
  write_haproxy_configs relay 0 "$P_RA_NGINX" "$P_RA_IPERF" "$P_RB_NGINX" "$P_RB_IPERF"
  local a b
  start_haproxy relay-a "$WORK/relay-a.cfg" "$P_RA_NGINX"; a=$LAST_PID
  start_haproxy relay-b "$WORK/relay-b.cfg" "$P_RB_NGINX"; b=$LAST_PID
  bench_setup relay "$P_RB_NGINX" "$P_RB_IPERF" A="$a" B="$b"
  stop_proc "$b"; stop_proc "$a"
}

# ------------------------------------------------------------------ report --
fmt() { # fmt VALUE KIND -> formatted cell
  local v=${1:-NA}
  is_num "$v" || { echo "n/a"; return; }
  case $2 in
    int) awk -v v="$v" 'BEGIN { printf "%.0f", v }' ;;
    ms) awk -v v="$v" 'BEGIN { printf "%.3f", v }' ;;
    gbit) awk -v v="$v" 'BEGIN { printf "%.2f", v / 1e9 }' ;;
    mib) awk -v v="$v" 'BEGIN { printf "%.1f", v / 1024 }' ;;
    *) echo "$v" ;;
  esac
}

COLS=(direct strait haproxy)      # the report's columns; main adds relay when RELAY=1

cells_row() { # cells_row LABEL CELL...: one Markdown table row
  local label=$1; shift
  printf '| %s |' "$label"; printf ' %s |' "$@"; printf '\n'
}

row() { # row LABEL KEY KIND: one table row across the setups
  local label=$1 key=$2 kind=$3 s cells=()
  for s in "${COLS[@]}"; do
    if [[ $s == strait ]] && ((!RUN_STRAIT)); then cells+=("skipped")
    elif [[ $s == direct && ($key == rss* || $key == cpu_s || $key == per_conn*) ]]; then cells+=("-")
    else cells+=("$(fmt "${R[$s:$key]:-NA}" "$kind")"); fi
  done
  cells_row "$label" "${cells[@]}"
}

errs_cell() { # errs_cell SETUP
  local s=$1
  if [[ $s == strait ]] && ((!RUN_STRAIT)); then echo skipped; return; fi
  echo "${R[$s:ka.err]:-?}/${R[$s:ka.non2xx]:-?} / ${R[$s:nc.err]:-?}/${R[$s:nc.non2xx]:-?}"
}

# ratio_row LABEL NUM DEN OP TARGET UNIT [context]: with `context` the row only sets the
# ratio beside the target it informs, with no verdict.
ratio_row() {
  local label=$1 num=$2 den=$3 op=$4 target=$5 unit=$6 context=${7:-} val verdict
  if is_num "$num" && is_num "$den" && awk -v d="$den" 'BEGIN { exit !(d > 0) }'; then
    val=$(awk -v n="$num" -v d="$den" 'BEGIN { printf "%.2f", n / d }')
    if [[ -n $context ]]; then verdict="context, no target"
    elif awk -v n="$num" -v d="$den" -v t="$target" -v op="$op" \
      'BEGIN { v = n / d; exit !((op == ">=") ? (v >= t) : (v <= t)) }'; then verdict=met
    else verdict="NOT met"; fi
    printf '| %s | %s%s | %s %s%s | %s |\n' "$label" "$val" "$unit" "$op" "$target" "$unit" "$verdict"
  else
    printf '| %s | n/a | %s %s%s | n/a (not measured) |\n' "$label" "$op" "$target" "$unit"
  fi
}

sum() { if is_num "${1:-}" && is_num "${2:-}"; then echo $(($1 + $2)); else echo NA; fi; }

per() { # per SETUP CPU_KEY COUNT_KEY UNIT -> CPU seconds per UNIT counted, or n/a
  local cpu=${R[$1:$2]:-NA} count=${R[$1:$3]:-NA}
  if is_num "$cpu" && is_num "$count" && awk -v c="$count" 'BEGIN { exit !(c > 0) }'; then
    awk -v s="$cpu" -v c="$count" -v u="$4" 'BEGIN { printf "%.3f", s * u / c }'
  else echo n/a; fi
}

per_row() { # per_row LABEL CPU_KEY COUNT_KEY UNIT: `per` for every gateway column
  local label=$1 s cells=()
  for s in "${COLS[@]}"; do
    if [[ $s == direct ]]; then cells+=("-")
    elif [[ $s == strait ]] && ((!RUN_STRAIT)); then cells+=("skipped")
    else cells+=("$(per "$s" "$2" "$3" "$4")"); fi
  done
  cells_row "$label" "${cells[@]}"
}

pct() { # pct PART WHOLE -> "N.N%" or n/a
  if is_num "${1:-}" && is_num "${2:-}" && (($2 > 0)); then
    awk -v p="$1" -v w="$2" 'BEGIN { printf "%.1f%%", 100 * p / w }'
  else echo n/a; fi
}

report() {
  local ncpu cpu_model
  ncpu=$(nproc)
  cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  echo "# strait gateway benchmark ($(date -u '+%Y-%m-%d %H:%M:%SZ'))"
  echo
  echo "Host: $(uname -sr), $ncpu CPU(s) ($cpu_model). Loopback (127.0.0.1) only."
  echo "Client (wrk/iperf3), backends (nginx, iperf3 -s) and both gateways of a pair all share these $ncpu CPU(s)."
  echo
  cells_row Metric "${COLS[@]}"
  local c seps=()
  for c in "${COLS[@]}"; do seps+=("---:"); done
  cells_row "---" "${seps[@]}"
  row "Keep-alive rate (req/s)" ka.rps int
  row "Keep-alive latency p50 (ms)" ka.p50 ms
  row "Keep-alive latency p99 (ms)" ka.p99 ms
  row "New-connection rate (req/s, Connection: close)" nc.rps int
  row "New-connection latency p50 (ms)" nc.p50 ms
  row "New-connection latency p99 (ms)" nc.p99 ms
  row "iperf3 single stream (Gbit/s, received)" iperf.bps gbit
  local s cells=()
  for s in "${COLS[@]}"; do cells+=("$(errs_cell "$s")"); done
  cells_row "wrk socket errors/non-2xx (keep-alive / new-conn)" "${cells[@]}"
  row "Gateway A (exporter) RSS idle, 1 s (MiB)" rss_idle.A mib
  row "Gateway B (importer) RSS idle, 1 s (MiB)" rss_idle.B mib
  row "Gateway A (exporter) RSS idle, steady (MiB)" rss_steady.A mib
  row "Gateway B (importer) RSS idle, steady (MiB)" rss_steady.B mib
  row "Gateway A (exporter) RSS peak under load (MiB)" rss_peak.A mib
  row "Gateway B (importer) RSS peak under load (MiB)" rss_peak.B mib
  row "Gateway CPU time A+B during load (s)" cpu_s raw
  row "Memory per idle proxied connection, gateway A (KiB)" per_conn.A raw
  row "Memory per idle proxied connection, gateway B (KiB)" per_conn.B raw
  per_row "Gateway CPU s per 1,000 keep-alive requests (A+B)" ka.cpu ka.requests 1000
  per_row "Gateway CPU s per 1,000 new connections (A+B)" nc.cpu nc.requests 1000
  per_row "Gateway CPU s per GB moved (A+B, iperf3)" iperf.cpu iperf.bytes 1000000000
  echo
  echo "## Ratios"
  echo
  echo "| Ratio | value | target | verdict |"
  echo "|---|---:|---:|---|"
  ratio_row "keep-alive req/s (strait / haproxy)" "${R[strait:ka.rps]:-NA}" "${R[haproxy:ka.rps]:-NA}" ">=" 1.3 x
  ratio_row "keep-alive p99 (strait / haproxy)" "${R[strait:ka.p99]:-NA}" "${R[haproxy:ka.p99]:-NA}" "<=" 1.0 x
  ratio_row "new-connection req/s (strait / direct)" "${R[strait:nc.rps]:-NA}" "${R[direct:nc.rps]:-NA}" ">=" 0.5 x
  ratio_row "iperf3 throughput (strait / haproxy)" "${R[strait:iperf.bps]:-NA}" "${R[haproxy:iperf.bps]:-NA}" ">=" 1.0 x
  if ((RELAY)); then # context, not targets: the same ratios for two hops without encryption
    ratio_row "context: keep-alive req/s (relay / haproxy)" "${R[relay:ka.rps]:-NA}" "${R[haproxy:ka.rps]:-NA}" ">=" 1.3 x context
    ratio_row "context: new-connection req/s (relay / direct)" "${R[relay:nc.rps]:-NA}" "${R[direct:nc.rps]:-NA}" ">=" 0.5 x context
  fi
  local role
  for role in A B; do
    ratio_row "strait idle RSS (steady), gateway $role (MiB)" "${R[strait:rss_steady.$role]:-NA}" 1024 "<=" 10 " MiB"
  done
  for role in A B; do
    ratio_row "strait memory per idle connection, gateway $role (KiB)" "${R[strait:per_conn.$role]:-NA}" 1 "<=" 16 " KiB"
  done
  echo
  echo "## Setup"
  echo
  echo "- Loads: each ${DURATION}s (DURATION), after ${WARMUP}s keep-alive warm-up per setup (WARMUP)." \
    "Keep-alive: \`wrk -t$WRK_THREADS -c$WRK_CONNS -d${DURATION}s --latency\`;" \
    "new-connection: same plus \`-H 'Connection: close'\` (wrk latency excludes TCP connect);" \
    "throughput: \`iperf3 -c ... -t $DURATION -J\`, end.sum_received.bits_per_second."
  echo "- Backends: $(nginx -v 2>&1 | sed 's/^nginx version: //'), worker_processes $NGINX_WORKERS (NGINX_WORKERS)," \
    "access_log off, keepalive_requests 1000000, static ${BODY_PATH} of 1024 bytes; $(iperf3 -v | head -n1 | cut -d' ' -f1-2) server."
  echo "- Threads: strait STRAIT_WORKER_THREADS=$THREADS, haproxy nbthread $THREADS (THREADS)."
  [[ -z $STRAIT_TUNNEL ]] || echo "- strait tunnel settings (STRAIT_TUNNEL): \`$STRAIT_TUNNEL\`."
  if ((RUN_STRAIT)); then
    echo "- strait: ${R[strait:version]:-$STRAIT}; QUIC mTLS tunnel, $([[ -n $STRAIT_TUNNEL ]] && echo "tunnel settings above" || echo "default tunnel settings"), RUST_LOG=${RUST_LOG:-warn}."
  else
    echo "- strait: skipped (SKIP_STRAIT=1)."
  fi
  echo "- HAProxy: $(haproxy -v | head -n1 | awk '{ print $1, $2, $3 }'), OpenSSL $(openssl version | awk '{ print $2 }')," \
    "mode tcp, TLS 1.3 only, mTLS (A: \`ssl crt ... ca-file ca.pem verify required\`;" \
    "B: \`server ... ssl crt ... ca-file ca.pem verify required\`; chain check only, no identity/SAN check)." \
    "Each gateway is one process (\`haproxy -db\`, no master-worker), so its RSS covers all its threads."
  echo "- HAProxy TLS session reuse: allowed (defaults: server-side session reuse, TLS tickets, tune.ssl.cachesize 20000)." \
    "Observed on haproxy A over the whole run: ${R[haproxy:tls_full]:-n/a} full and" \
    "${R[haproxy:tls_reused]:-n/a} resumed TLS handshakes ($(pct "${R[haproxy:tls_reused]:-}" \
      "$(sum "${R[haproxy:tls_full]:-}" "${R[haproxy:tls_reused]:-}")") resumed)." \
    "In mode tcp every client TCP connection is its own TLS connection (no pooling); keep-alive is end to end."
  if ((RELAY)); then
    echo "- relay (RELAY=1): the same HAProxy pair with no TLS between the two, i.e. two plain TCP relay hops;" \
      "not a target, but what any two-gateway path costs on this machine before encryption." \
      "Its \"context\" ratios say how far the same targets are from an unencrypted pair."
  fi
  echo "- Caveat: this is the distro HAProxy build linked against OpenSSL 3.0, which HAProxy upstream reports as" \
    "clearly slower than OpenSSL 1.1.1 for TLS handshakes with several threads; the haproxy column's new-connection row inherits that."
  local pki_note="\`strait pki init\` / \`strait pki issue\`"
  [[ $PKI_TOOL == strait ]] || pki_note="openssl test PKI (no strait binary; SKIP_STRAIT run only)"
  echo "- PKI: $pki_note; ECDSA P-256, one CA for both strait and HAProxy."
  echo "- RSS: VmRSS from /proc/PID/status; idle, 1 s = after readiness, one smoke request and 1 s settle;" \
    "idle, steady = the highest of 10 samples a second from ${IDLE_STEADY} s later on (IDLE_STEADY), past strait's 10 s memory pass;" \
    "peak = max of 200 ms samples during warm-up + all loads. CPU time = utime+stime of both gateway processes over the loads." \
    "Memory per idle connection: growth of each gateway's anonymous memory (RssAnon) while $IDLE_CONNS client connections (IDLE_CONNS) are held open," \
    "each after one full request and answer, divided by their number."
  echo "- CPU pinning: $PIN_NOTE."
}

# -------------------------------------------------------------------- main --
main() {
  validate_env
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  ensure_tools
  ensure_strait
  setup_pinning
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

  WORK=$(mktemp -d -t strait-bench.XXXXXX)
  mkdir -p "$WORK/logs" "$WORK/results"
  log "workdir $WORK"
  read -r P_NGINX P_IPERF P_SA_TUNNEL P_SA_ADMIN P_SB_TUNNEL P_SB_ADMIN P_SB_NGINX P_SB_IPERF \
    P_HA_NGINX P_HA_IPERF P_HB_NGINX P_HB_IPERF P_RA_NGINX P_RA_IPERF P_RB_NGINX P_RB_IPERF \
    <<<"$(free_ports 16)"
  [[ -n ${P_RB_IPERF:-} ]] || die "could not allocate ports"

  setup_pki
  start_nginx
  start_iperf_server

  bench_direct
  bench_strait
  bench_haproxy
  bench_relay
  ((!RELAY)) || COLS+=(relay)

  mkdir -p "$OUT_DIR"
  local out
  out=$OUT_DIR/gateway-bench-$(date -u +%Y%m%dT%H%M%SZ).md
  report | tee "$out"
  log "report written to $out"
}

main "$@"
