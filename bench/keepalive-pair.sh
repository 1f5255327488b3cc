#!/usr/bin/env bash
# keepalive-pair.sh - HTTP requests through a strait gateway pair on loopback, for several
# binaries in interleaved rounds: the quick look behind docs/BENCHMARKS.md's issue-15
# per-request figures (the full comparison with HAProxy is gateway-bench.sh).
#
#   bash bench/keepalive-pair.sh BINARY...
#
# nginx serves a 1 KiB file; gateway B imports it from gateway A; `wrk -t2 -c16` runs
# DURATION seconds through B after a 1 s warm-up. Per load it prints req/s, each gateway's
# CPU µs per request (and the user-space part) and its context switches per request
# (voluntary + involuntary, all threads).
#
# PERF_STAT=1 also counts gateway B's syscalls and scheduler events per request with
# `perf stat` tracepoints (cheap, unlike strace, which serialises the threads).
# PERF_RECORD=1 instead samples gateway B (`perf record`, cpu-clock) and prints up to 25
# of its hottest symbols (0.5% or more), user space and kernel.
#
# Environment: ROUNDS (3), DURATION (5), THREADS (STRAIT_WORKER_THREADS, 2), CLOSE=1 for
# `Connection: close`, STRAIT_TUNNEL (extra `tunnel:` lines, as in tunnel-stream.sh),
# KEEP_WORK=1 to keep the temp dir (configs, logs). Needs nginx, wrk, curl, python3 (and
# perf for PERF_STAT / PERF_RECORD).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
THREADS=${THREADS:-2}
CLOSE=${CLOSE:-0}
PERF_STAT=${PERF_STAT:-0}
PERF_RECORD=${PERF_RECORD:-0}
(($# > 0)) || { echo "usage: $0 STRAIT_BINARY..." >&2; exit 2; }
for b in "$@"; do [[ -x $b ]] || { echo "not an executable: $b" >&2; exit 2; }; done
for t in nginx wrk curl python3; do
  command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 2; }
done
((!PERF_STAT && !PERF_RECORD)) || command -v perf >/dev/null || { echo "PERF_STAT / PERF_RECORD need perf" >&2; exit 2; }
((!(PERF_STAT && PERF_RECORD))) || { echo "PERF_STAT and PERF_RECORD: one at a time" >&2; exit 2; }

WORK=$(mktemp -d /tmp/strait-keepalive.XXXXXX)
NGINX=""
GATEWAYS=()
perf_pid=""
stop_gateways() {
  ((${#GATEWAYS[@]})) || return 0
  kill -9 "${GATEWAYS[@]}" 2>/dev/null || true
  for p in "${GATEWAYS[@]}"; do wait "$p" 2>/dev/null || true; done
  GATEWAYS=()
}
cleanup() {
  if [[ -n $perf_pid ]]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; fi
  stop_gateways
  if [[ -n $NGINX ]]; then kill -TERM "$NGINX" 2>/dev/null || true; wait "$NGINX" 2>/dev/null || true; fi
  [[ -n ${KEEP_WORK:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=pair-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/pair-lib.sh"

read -r P_NGINX P_TA P_TB P_AA P_AB P_IMPORT <<<"$(free_ports 6)"
mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
chmod a+rX "$WORK" "$WORK/www" "$WORK/www/1k.bin" # nginx's workers run as another user
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$P_NGINX; root $WORK/www; }
}
EOF
nginx -c "$WORK/nginx.conf" -p "$WORK" &
NGINX=$!

pair_pki "$1" "$WORK" keepalive.strait ka-a ka-b
pair_configs "$WORK" keepalive.strait ka-a ka-b web http "$P_NGINX" "$P_IMPORT" \
  "$P_TA" "$P_AA" "$P_TB" "$P_AB"

# counters PID -> "cpu_ticks user_ticks voluntary involuntary" over all its threads
counters() {
  local f
  read -r -a f <"/proc/$1/stat"
  cat /proc/"$1"/task/*/status | awk -v t=$((f[13] + f[14])) -v u="${f[13]}" '
    /^voluntary_ctxt/ { v += $2 } /^nonvoluntary_ctxt/ { n += $2 }
    END { print t, u, v, n }'
}

gateway() { # gateway BINARY a|b
  cd "$WORK" && STRAIT_WORKER_THREADS=$THREADS RUST_LOG=warn \
    exec "$1" run --config "ka-$2.yaml" >"$WORK/$2.log" 2>&1
}

url=http://127.0.0.1:$P_IMPORT/1k.bin
wrk_args=(-t2 -c16)
((!CLOSE)) || wrk_args+=(-H 'Connection: close')
events=raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_sendmsg
events+=,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_writev
events+=,syscalls:sys_enter_recvfrom,syscalls:sys_enter_accept4,syscalls:sys_enter_connect
events+=,sched:sched_switch,sched:sched_wakeup
hz=$(getconf CLK_TCK)

for r in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    gateway "$bin" a & a=$!; GATEWAYS+=("$a")
    gateway "$bin" b & b=$!; GATEWAYS+=("$b")
    for i in $(seq 100); do
      curl -sf -o /dev/null "$url" && break
      ((i < 100)) || { tail -n3 "$WORK"/*.log "$WORK/nginx.err" >&2; echo "pair not serving" >&2; exit 1; }
      sleep 0.1
    done
    wrk "${wrk_args[@]}" -d1s "$url" >/dev/null
    read -r a0 <<<"$(counters "$a")"; read -r b0 <<<"$(counters "$b")"
    perf_pid=""
    if ((PERF_STAT)); then
      timeout -s INT "$DURATION" perf stat -x, -o "$WORK/perf.csv" -e "$events" -p "$b" &
      perf_pid=$!
    elif ((PERF_RECORD)); then
      timeout -s INT "$DURATION" perf record -q -e cpu-clock -o "$WORK/perf.data" -p "$b" 2>/dev/null &
      perf_pid=$!
    fi
    out=$(wrk "${wrk_args[@]}" -d"${DURATION}s" "$url")
    [[ -z $perf_pid ]] || { wait "$perf_pid" || true; perf_pid=""; }
    read -r a1 <<<"$(counters "$a")"; read -r b1 <<<"$(counters "$b")"
    n=$(awk '/requests in/ { print $1 }' <<<"$out")
    python3 - "$bin" "$n" "$DURATION" "$hz" "$a0" "$a1" "$b0" "$b1" <<'EOF'
import os, sys
bin, n, d, hz = os.path.basename(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def per(before, after):
    b, a = [int(x) for x in before.split()], [int(x) for x in after.split()]
    cpu, user, vol, inv = [(y - x) for x, y in zip(b, a)]
    return "%.1f µs (user %.1f), %.2f+%.2f switches" % (
        cpu / hz * 1e6 / n, user / hz * 1e6 / n, vol / n, inv / n)
print("%-20s %7.0f req/s | A %s | B %s" % (
    bin, n / d, per(sys.argv[5], sys.argv[6]), per(sys.argv[7], sys.argv[8])))
EOF
    if ((PERF_STAT)); then
      awk -F, -v n="$n" '$3 ~ /:/ { printf "    B %-34s %.2f per request\n", $3, $1 / n }' "$WORK/perf.csv"
    elif ((PERF_RECORD)); then
      # awk reads all of its input (no SIGPIPE under pipefail) and keeps the first 25.
      perf report -q -i "$WORK/perf.data" --sort dso,symbol --percent-limit 0.5 2>/dev/null |
        awk '{ sub(/[[:space:]-]+$/, "") } NF && ++k <= 25 { print "    B " $0 }' ||
        echo "    B (no profile: perf record or report failed)"
    fi
    stop_gateways
  done
done
