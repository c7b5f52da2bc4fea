#!/usr/bin/env bash
# Start a SuperLink and N SuperNodes (default 3) on 127.0.0.1; SuperNode i is fedseed client i.
#   scripts/flower-start.sh [N]
# TLS=1: the SuperLink serves TLS (certificates from scripts/flower-certs.sh) and admits only
# registered SuperNodes (each node's public key is registered here, under the node's index).
# GATEWAY=1 (with TLS=1): the SuperLink listens on 127.0.0.1 only and `fedseed fleet-gateway` exposes
# its Fleet API alone on 127.0.0.2:$FLOWER_GATEWAY_PORT, where the nodes connect.
# PARTS=DIR: node i trains on DIR/client-<iii>.* only (`fedseed partition CONFIG --out DIR`).
# PIDs go to $FEDSEED_FLOWER_DIR/pids, logs to $FEDSEED_FLOWER_DIR/logs; scripts/flower-stop.sh ends them.
set -euo pipefail
HERE=$(dirname "$0")
. "$HERE/flower-env.sh"
N=${1:-3}
D=$FEDSEED_FLOWER_DIR
C=$D/certs
cd "$HERE/.."   # relative output_dir, model and data paths in the run-config resolve from the repository root
if [[ ${TLS:-0} == 1 ]]; then
  SECURITY=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key"
            --enable-supernode-auth)
  CONNECTION=loopback-tls
else
  SECURITY=(--insecure)
  CONNECTION=loopback
fi
: > "$D/logs/superlink.log"
flower-superlink "${SECURITY[@]}" --disable-runtime-dependency-installation --host 127.0.0.1 \
  --port "$FLOWER_PORT" >> "$D/logs/superlink.log" 2>&1 &
echo $! > "$D/pids/superlink.pid"
python - "$FLOWER_PORT" "${TLS:-0}" "$C/ca.crt" <<'PY'   # wait for /health (about 2 s)
import ssl, sys, time, urllib.request
port, tls, ca = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
ctx = ssl.create_default_context(cafile=ca) if tls else None
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=1, context=ctx)
        sys.exit(0)
    except OSError:
        time.sleep(0.25)
sys.exit(f"no SuperLink answering at {url}")
PY
echo "SuperLink up on 127.0.0.1:$FLOWER_PORT (pid $(cat "$D/pids/superlink.pid"), log $D/logs/superlink.log)"
if [[ ${GATEWAY:-0} == 1 ]]; then
  fedseed fleet-gateway --listen "127.0.0.2:$FLOWER_GATEWAY_PORT" --superlink "127.0.0.1:$FLOWER_PORT" \
    --certfile "$C/server.pem" --keyfile "$C/server.key" --upstream-ca "$C/ca.crt" >> "$D/logs/gateway.log" 2>&1 &
  echo $! > "$D/pids/gateway.pid"
  for _ in $(seq 1 120); do
    (exec 3<>"/dev/tcp/127.0.0.2/$FLOWER_GATEWAY_PORT") 2>/dev/null && break
    kill -0 "$(cat "$D/pids/gateway.pid")" 2>/dev/null || { tail -5 "$D/logs/gateway.log" >&2; exit 1; }
    sleep 0.25
  done
  export SUPERLINK="127.0.0.2:$FLOWER_GATEWAY_PORT"
  echo "fleet gateway up on $SUPERLINK (pid $(cat "$D/pids/gateway.pid")): the Fleet API only"
fi
starting=()
for ((i = 0; i < N; i++)); do
  if [[ ${TLS:-0} == 1 ]]; then
    flwr supernode register "$C/supernode$i.pub" "$CONNECTION" | tail -1
  fi
  : > "$D/logs/supernode$i.log"
  : > "$D/logs/worker$i.log"
  "$HERE/flower-node.sh" "$i" &   # the nodes start side by side, each waiting for its own worker and id
  starting+=($!)
done
for pid in "${starting[@]}"; do wait "$pid" || { echo "a SuperNode did not start (logs in $D/logs)" >&2; exit 1; }; done
