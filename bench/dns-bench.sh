#!/usr/bin/env bash
# strait's DNS server vs Knot DNS, same records, same run, one core each (see
# bench/README.md). Loopback only; every load is bounded by -l seconds.
#
#   bash bench/dns-bench.sh
#
# Environment: SERVICES (1000), DURATION (10 s per load), CLIENTS (dnsperf -c, 8),
# OUTSTANDING (dnsperf -q, 200), SERVER_CPU (0), CLIENT_CPU (1), STRAIT_BIN (build when
# unset), OUT_DIR (bench/out), KEEP_WORK (0).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVICES=${SERVICES:-1000}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
OUTSTANDING=${OUTSTANDING:-200}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT_DIR=${OUT_DIR:-$REPO_ROOT/bench/out}
KEEP_WORK=${KEEP_WORK:-0}
P_STRAIT=${P_STRAIT:-15353}
P_KNOT=${P_KNOT:-15354}

log() { echo "[dns-bench] $*" >&2; }

need() {
  local missing=()
  command -v knotd >/dev/null || missing+=(knot)
  command -v dnsperf >/dev/null || missing+=(dnsperf)
  command -v dig >/dev/null || missing+=(bind9-dnsutils)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}
need

if [[ -z ${STRAIT_BIN:-} ]]; then
  # A release build without whole-program LTO: minutes instead of most of an hour on two
  # cores; the DNS path is one crate, so LTO changes little here.
  log "building strait (release, thin LTO)"
  (cd "$REPO_ROOT" && CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo build --release -p strait-gateway) >&2
  STRAIT_BIN=$REPO_ROOT/target/release/strait
fi

WORK=$(mktemp -d /tmp/strait-dns-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ $KEEP_WORK == 1 ]] && log "work dir kept: $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

# --- the same 1,000 services for both ---------------------------------------------------
"$STRAIT_BIN" pki init --dir "$WORK/ca" --trust-domain bench.strait >/dev/null
"$STRAIT_BIN" pki issue --ca "$WORK/ca" --cluster bench --out "$WORK" >/dev/null
cp "$WORK/ca/ca.pem" "$WORK/ca.pem"
python3 - "$WORK" "$SERVICES" "$P_STRAIT" <<'EOF'
import sys
work, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
addr = lambda i: f"127.77.{i // 250}.{i % 250 + 1}"
y = [
    "cluster: bench", "region: bench", "trust_domain: bench.strait",
    "listen:", "  tunnel: 127.0.0.1:0", "  admin: 127.0.0.1:0", f"  dns: 127.0.0.1:{port}",
    "tls: {ca: ca.pem, cert: bench.pem, key: bench.key}",
    "peers: [{cluster: remote, address: '127.0.0.1:9'}]",
    "imports:",
]
z = [
    "$ORIGIN clusterset.local.", "$TTL 5",
    "@ SOA ns.dns hostmaster 1 60 30 3600 5", "@ NS ns.dns",
    'dns-version TXT "1.0.0"',
]
q = []
for i in range(n):
    name = f"svc-{i}"
    y.append(f"  - {{name: {name}, namespace: bench, address: {addr(i)}, "
             f"ports: [{{name: http, port: 8080}}], clusters: [remote]}}")
    z.append(f"{name}.bench.svc A {addr(i)}")
    z.append(f"{name}.bench.svc SRV 0 100 8080 {name}.bench.svc")
    z.append(f"_http._tcp.{name}.bench.svc SRV 0 100 8080 {name}.bench.svc")
    q.append(f"{name}.bench.svc.clusterset.local A")
    q.append(f"_http._tcp.{name}.bench.svc.clusterset.local SRV")
open(f"{work}/strait.yaml", "w").write("\n".join(y) + "\n")
open(f"{work}/clusterset.local.zone", "w").write("\n".join(z) + "\n")
open(f"{work}/queries.txt", "w").write("\n".join(q) + "\n")
EOF
cat >"$WORK/knot.conf" <<EOF
server:
    rundir: "$WORK"
    listen: 127.0.0.1@$P_KNOT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "$WORK/knotdb"
zone:
  - domain: clusterset.local
    storage: "$WORK"
    file: clusterset.local.zone
    journal-content: none
    zonefile-sync: -1
EOF

# --- servers, pinned to one core --------------------------------------------------------
RUST_LOG=warn STRAIT_WORKER_THREADS=1 taskset -c "$SERVER_CPU" \
  "$STRAIT_BIN" run --config "$WORK/strait.yaml" >"$WORK/strait.log" 2>&1 &
PIDS+=($!)
STRAIT_PID=$!
taskset -c "$SERVER_CPU" knotd -c "$WORK/knot.conf" >"$WORK/knot.log" 2>&1 &
PIDS+=($!)
KNOT_PID=$!

ready() { # port name
  for _ in $(seq 1 100); do
    if dig +time=1 +tries=1 @127.0.0.1 -p "$1" svc-0.bench.svc.clusterset.local A +short | grep -q .; then
      return 0
    fi
    sleep 0.1
  done
  log "$2 did not answer; log:"; cat "$WORK/$2.log" >&2; exit 1
}
ready "$P_STRAIT" strait
ready "$P_KNOT" knot

# Both must give the same answers before they are compared.
for q in "svc-7.bench.svc.clusterset.local A" "_http._tcp.svc-7.bench.svc.clusterset.local SRV"; do
  a=$(dig @127.0.0.1 -p "$P_STRAIT" $q +short | sort)
  b=$(dig @127.0.0.1 -p "$P_KNOT" $q +short | sort)
  [[ $a == "$b" ]] || { log "answers differ for $q: strait '$a' knot '$b'"; exit 1; }
done

perf() { # port rate(0=max) outfile [extra]
  local rate=() ; [[ $2 != 0 ]] && rate=(-Q "$2")
  taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries.txt" -l "$DURATION" \
    -c "$CLIENTS" -T 1 -q "$OUTSTANDING" "${rate[@]}" "${@:4}" >"$3" 2>&1
}
field() { awk -v k="$2" '$0 ~ k {for (i=1;i<=NF;i++) if ($i ~ /^[0-9.]+$/) {print $i; exit}}' "$1"; }
lost() { awk '/Queries lost/ {print $3}' "$1"; }

# Per-query latencies of a verbose run → p50 / p99 in microseconds.
pct() {
  python3 - "$1" <<'EOF'
import sys
lat = sorted(float(l.split()[-1]) for l in open(sys.argv[1]) if l.startswith("> NOERROR"))
if not lat: print("n/a n/a"); sys.exit()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6
print(f"{p(0.5):.0f} {p(0.99):.0f}")
EOF
}

declare -A PEAK LOST HALF P50 P99 HLOST CPU
for srv in strait knot; do
  port=$P_STRAIT; pid=$STRAIT_PID
  [[ $srv == knot ]] && { port=$P_KNOT; pid=$KNOT_PID; }
  log "$srv: peak (${DURATION}s, -c $CLIENTS -q $OUTSTANDING)"
  t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  perf "$port" 0 "$WORK/$srv-peak.txt"
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  PEAK[$srv]=$(field "$WORK/$srv-peak.txt" "Queries per second")
  LOST[$srv]=$(lost "$WORK/$srv-peak.txt")
  CPU[$srv]=$(python3 -c "print(f'{($t1-$t0)/100/$DURATION*100:.0f}%')")
  HALF[$srv]=$(python3 -c "print(int(float('${PEAK[$srv]}')/2))")
  log "$srv: ${HALF[$srv]} q/s (half peak), per-query latency"
  perf "$port" "${HALF[$srv]}" "$WORK/$srv-half.txt" -v
  read -r P50[$srv] P99[$srv] < <(pct "$WORK/$srv-half.txt")
  HLOST[$srv]=$(lost "$WORK/$srv-half.txt")
done

ratio=$(python3 -c "print(f\"{float('${PEAK[strait]}')/float('${PEAK[knot]}'):.2f}\")")
met() { python3 -c "print('met' if $1 else 'NOT met')"; }
mkdir -p "$OUT_DIR"
report="$OUT_DIR/dns-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# DNS: strait vs Knot DNS ($(date -u +%F), $(nproc) cores, $(knotd --version | head -1))"
  echo
  echo "$SERVICES services (A + SRV queries, alternating), dnsperf -c $CLIENTS -q $OUTSTANDING -T 1 -l $DURATION on CPU $CLIENT_CPU; each server pinned to CPU $SERVER_CPU (strait: 1 worker thread; Knot: 1 UDP worker)."
  echo
  echo "| server | peak q/s | lost at peak | server CPU at peak | half-peak q/s | lost | p50 | p99 |"
  echo "|---|---|---|---|---|---|---|---|"
  for srv in strait knot; do
    echo "| $srv | ${PEAK[$srv]} | ${LOST[$srv]} | ${CPU[$srv]} | ${HALF[$srv]} | ${HLOST[$srv]} | ${P50[$srv]} µs | ${P99[$srv]} µs |"
  done
  echo
  echo "- strait / Knot peak: **${ratio}x** (target ≥ 1.0x): $(met "$ratio >= 1.0")"
  echo "- strait p99 at half peak: **${P99[strait]} µs** (target < 1000 µs): $(met "'${P99[strait]}' != 'n/a' and float('${P99[strait]}') < 1000")"
  echo "- strait queries lost at peak: ${LOST[strait]}"
} | tee "$report"
log "report: $report"
