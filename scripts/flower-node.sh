#!/usr/bin/env bash
# Start (or restart) SuperNode I on loopback: fedseed client I, caching its copy in $FEDSEED_FLOWER_DIR/nodes/I.
#   scripts/flower-node.sh I [EXTRA_NODE_CONFIG]     e.g. 'model.name_or_path="/models/stories260K"'
# TLS=1: connect with TLS and authenticate with certs/supernodeI (registered by flower-start.sh).
set -euo pipefail
. "$(dirname "$0")/flower-env.sh"
I=$1
D=$FEDSEED_FLOWER_DIR
cd "$(dirname "$0")/.."   # relative model and data paths in the run-config resolve from the repository root
if [[ ${TLS:-0} == 1 ]]; then
  SECURITY=(--root-certificates "$D/certs/ca.crt" --auth-supernode-private-key "$D/certs/supernode$I")
else
  SECURITY=(--insecure)
fi
# Several ClientApps share this machine: one torch thread each unless OMP_NUM_THREADS says otherwise.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} flower-supernode "${SECURITY[@]}" \
  --superlink "127.0.0.1:$FLOWER_PORT" --port $((FLOWER_NODE_PORT + I)) \
  --node-config "partition-id=$I cache-dir=\"$D/nodes/$I\" ${2:-}" \
  >> "$D/logs/supernode$I.log" 2>&1 &
echo $! > "$D/pids/supernode$I.pid"
for _ in $(seq 1 120); do     # the node logs its id once the SuperLink has accepted it
  grep -q "SuperNode ID\|Node ID" "$D/logs/supernode$I.log" 2>/dev/null && break
  kill -0 "$(cat "$D/pids/supernode$I.pid")" 2>/dev/null || { tail -5 "$D/logs/supernode$I.log" >&2; exit 1; }
  sleep 0.5
done
echo "SuperNode $I up (pid $(cat "$D/pids/supernode$I.pid"), log $D/logs/supernode$I.log)"
