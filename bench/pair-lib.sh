# pair-lib.sh - sourced by the bench scripts: ports, PKI and configs for a strait pair on
# loopback (gateway A exports one service, gateway B imports it from A).

# shellcheck source=tunnel-yaml.sh
source "$(dirname "${BASH_SOURCE[0]}")/tunnel-yaml.sh"

# free_ports N: N distinct ports on 127.0.0.1, each free for TCP *and* UDP (the sockets
# are held until all are chosen, so the N ports never repeat).
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
n, held, ports = int(sys.argv[1]), [], []
while len(ports) < n:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); u.close(); continue
    held += [t, u]; ports.append(p)
print(*ports)
EOF
}

# pair_pki BINARY DIR TRUST_DOMAIN ID...: a CA in DIR/ca, and DIR/ID.pem + DIR/ID.key for
# each cluster ID, plus DIR/ca.pem.
pair_pki() {
  local bin=$1 dir=$2 trust=$3 id
  shift 3
  "$bin" pki init --dir "$dir/ca" --trust-domain "$trust" >/dev/null
  for id in "$@"; do
    "$bin" pki issue --ca "$dir/ca" --cluster "$id" --out "$dir" >/dev/null
  done
  [[ -e $dir/ca.pem ]] || cp "$dir/ca/ca.pem" "$dir/"
}

# pair_configs DIR TRUST_DOMAIN A_ID B_ID SERVICE PORT_NAME TARGET_PORT IMPORT_PORT
#              TUNNEL_A ADMIN_A TUNNEL_B ADMIN_B
# Writes DIR/A_ID.yaml (exports SERVICE, port PORT_NAME 80, to 127.0.0.1:TARGET_PORT) and
# DIR/B_ID.yaml (imports it from A on 127.0.0.1:IMPORT_PORT), both with STRAIT_TUNNEL's
# `tunnel:` lines. Certificates are the ones pair_pki wrote into DIR.
pair_configs() {
  local dir=$1 trust=$2 a=$3 b=$4 service=$5 port_name=$6 target=$7 import=$8
  local ta=$9 aa=${10} tb=${11} ab=${12}
  {
    gateway_head "$a" "$trust" "$ta" "$aa"
    cat <<EOF
exports:
  - name: $service
    namespace: bench
    ports: [{name: $port_name, port: 80, target_port: $target}]
    endpoints: [{address: 127.0.0.1}]
EOF
  } >"$dir/$a.yaml"
  {
    gateway_head "$b" "$trust" "$tb" "$ab"
    cat <<EOF
peers: [{cluster: $a, address: "127.0.0.1:$ta"}]
imports:
  - name: $service
    namespace: bench
    address: 127.0.0.1
    ports: [{name: $port_name, port: 80, listen_port: $import}]
    clusters: [$a]
EOF
  } >"$dir/$b.yaml"
}

# gateway_head ID TRUST_DOMAIN TUNNEL_PORT ADMIN_PORT: the top of a bench gateway's config.
gateway_head() {
  cat <<EOF
cluster: $1
region: bench
trust_domain: $2
listen: {tunnel: "127.0.0.1:$3", admin: "127.0.0.1:$4"}
tls: {ca: ca.pem, cert: $1.pem, key: $1.key}
$(tunnel_yaml)
EOF
}
