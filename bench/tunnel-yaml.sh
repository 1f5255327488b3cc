# tunnel-yaml.sh - sourced by the bench scripts.
# tunnel_yaml: the `tunnel:` section of a strait config from STRAIT_TUNNEL
# ("key: value; key: value"), or nothing when it is empty.
tunnel_yaml() {
  [[ -n ${STRAIT_TUNNEL:-} ]] || return 0
  echo "tunnel:"
  local item items
  IFS=';' read -ra items <<<"$STRAIT_TUNNEL"
  for item in "${items[@]}"; do
    item=${item#"${item%%[![:space:]]*}"} # trim, keeping quotes
    item=${item%"${item##*[![:space:]]}"}
    if [[ -n $item ]]; then echo "  $item"; fi
  done
}
