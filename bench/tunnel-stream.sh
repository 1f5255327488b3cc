#!/usr/bin/env bash
# tunnel-stream.sh - one iperf3 stream through a strait gateway pair on loopback, for
# several binaries in interleaved rounds: the quick A/B behind docs/BENCHMARKS.md's issue-15
# manual figures (the full comparison with HAProxy is gateway-bench.sh).
#
#   bash bench/tunnel-stream.sh OLD_BINARY NEW_BINARY ...
#
# Per load it prints Gbit/s (iperf3, received), CPU seconds of both gateways per GB moved,
# their minor page faults per GB (/proc/PID/stat) and the tunnel's path MTU afterwards
# (`/v1/peers`). Each round restarts the pair. Environment: ROUNDS (3), LOADS per round (2),
# DURATION seconds per load (5), THREADS (STRAIT_WORKER_THREADS, 2), STRAIT_TUNNEL (extra
# `tunnel:` lines, "key: value; key: value"). Needs iperf3, curl, python3.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
LOADS=${LOADS:-2}
DURATION=${DURATION:-5}
THREADS=${THREADS:-2}
STRAIT_TUNNEL=${STRAIT_TUNNEL:-}
(($# > 0)) || { echo "usage: $0 STRAIT_BINARY..." >&2; exit 2; }
for b in "$@"; do [[ -x $b ]] || { echo "not an executable: $b" >&2; exit 2; }; done
for t in iperf3 curl python3; do
  command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/strait-stream.XXXXXX)
PIDS=()
stop_all() {
  ((${#PIDS[@]})) && kill -9 "${PIDS[@]}" 2>/dev/null || true
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_all; [[ -n ${KEEP_WORK:-} ]] || rm -rf "$WORK"' EXIT

# shellcheck source=pair-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/pair-lib.sh"

read -r P_IPERF P_TA P_TB P_AA P_AB P_IMPORT <<<"$(free_ports 6)"
pair_pki "$1" "$WORK" stream.strait stream-a stream-b
pair_configs "$WORK" stream.strait stream-a stream-b iperf iperf "$P_IPERF" "$P_IMPORT" \
  "$P_TA" "$P_AA" "$P_TB" "$P_AB"

# ticks (utime+stime) and minor faults of both gateways
usage() {
  local t=0 m=0 f p
  for p in "$@"; do
    read -r -a f <"/proc/$p/stat"
    t=$((t + f[13] + f[14])); m=$((m + f[9]))
  done
  echo "$t $m"
}

gateway() { # gateway BINARY a|b: runs stream-a or stream-b in the foreground
  cd "$WORK" && STRAIT_WORKER_THREADS=$THREADS RUST_LOG=warn \
    exec "$1" run --config "stream-$2.yaml" >"$WORK/$2.log" 2>&1
}

round() { # round BINARY
  local bin=$1 a b i c0 m0 c1 m1 mtu
  iperf3 -s -B 127.0.0.1 -p "$P_IPERF" >/dev/null 2>&1 & PIDS+=($!)
  gateway "$bin" a & a=$!; PIDS+=($a)
  gateway "$bin" b & b=$!; PIDS+=($b)
  for i in $(seq 100); do
    curl -sf "http://127.0.0.1:$P_AB/ready" >/dev/null && break
    ((i < 100)) || { echo "gateway B not ready: $(tail -3 "$WORK/b.log")" >&2; exit 1; }
    sleep 0.1
  done
  printf '%s:' "$bin"
  for i in $(seq "$LOADS"); do
    read -r c0 m0 <<<"$(usage "$a" "$b")"
    iperf3 -c 127.0.0.1 -p "$P_IMPORT" -t "$DURATION" -J >"$WORK/iperf.json"
    read -r c1 m1 <<<"$(usage "$a" "$b")"
    mtu=$(curl -sf "http://127.0.0.1:$P_AB/v1/peers" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)[0].get("mtu"))')
    python3 - "$WORK/iperf.json" "$((c1 - c0))" "$((m1 - m0))" "$(getconf CLK_TCK)" "$mtu" \
      <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["end"]["sum_received"]
gb = r["bytes"] / 1e9
ticks, faults, hz, mtu = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
print("  %.2f Gbit/s, %.3f CPU s/GB, %dk faults/GB, mtu %s"
      % (r["bits_per_second"] / 1e9, ticks / hz / gb, faults / gb / 1000, mtu), end=";")
EOF
  done
  echo
  stop_all
}

for r in $(seq "$ROUNDS"); do
  for bin in "$@"; do round "$bin"; done
done
