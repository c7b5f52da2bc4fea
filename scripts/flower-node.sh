#!/usr/bin/env bash
# Start (or restart) SuperNode I on loopback, and its resident fedseed worker: client I of the run.
#   scripts/flower-node.sh I [EXTRA_NODE_CONFIG]     e.g. 'data.path="parts/client-001.jsonl"'
# The node keeps what it writes in $FEDSEED_FLOWER_DIR/nodes/I; the worker (`fedseed worker`) holds its
# model, data and synced copy between rounds on the socket nodes/I/worker.sock (WORKER=0: no worker, each
# Flower message loads everything itself). PARTS=DIR gives node I the file DIR/client-<III>.* that
# `fedseed partition` wrote, as its own data.
# TLS=1: connect with TLS and authenticate with certs/supernodeI (registered by flower-start.sh);
# SUPERLINK=HOST:PORT overrides where it connects (the fleet gateway, with GATEWAY=1 in flower-start.sh).
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
NODE="$D/nodes/$I"
mkdir -p "$NODE"
DATA=""
if [[ -n ${PARTS:-} ]]; then
  file=$(ls -d "$PARTS"/client-"$(printf %03d "$I")"* | head -1)
  DATA="data.path=\"$file\""
fi
# Several ClientApps share this machine: one torch thread each unless OMP_NUM_THREADS says otherwise.
if [[ -f $D/pids/worker$I.pid ]]; then  # a restart: the old worker goes too
  kill "$(cat "$D/pids/worker$I.pid")" 2>/dev/null || true
fi
if [[ ${WORKER:-1} == 1 ]]; then
  rm -f "$NODE/worker.sock"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} fedseed worker --socket "$NODE/worker.sock" >> "$D/logs/worker$I.log" 2>&1 &
  echo $! > "$D/pids/worker$I.pid"
  for _ in $(seq 1 120); do [[ -S $NODE/worker.sock ]] && break; sleep 0.25; done
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} flower-supernode "${SECURITY[@]}" \
  --superlink "${SUPERLINK:-127.0.0.1:$FLOWER_PORT}" --port $((FLOWER_NODE_PORT + I)) \
  --node-config "partition-id=$I cache-dir=\"$NODE\" worker=\"$NODE/worker.sock\" $DATA ${2:-}" \
  >> "$D/logs/supernode$I.log" 2>&1 &
echo $! > "$D/pids/supernode$I.pid"
for _ in $(seq 1 120); do     # the node logs its id once the SuperLink has accepted it
  grep -q "SuperNode ID\|Node ID" "$D/logs/supernode$I.log" 2>/dev/null && break
  kill -0 "$(cat "$D/pids/supernode$I.pid")" 2>/dev/null || { tail -5 "$D/logs/supernode$I.log" >&2; exit 1; }
  sleep 0.5
done
echo "SuperNode $I up (pid $(cat "$D/pids/supernode$I.pid"), log $D/logs/supernode$I.log${DATA:+, $DATA})"
