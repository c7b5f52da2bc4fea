#!/usr/bin/env bash
# End, by PID, every process scripts/flower-start.sh and scripts/flower-node.sh started (each
# SuperNode and its fedseed worker, the fleet gateway, then the SuperLink, with the flower-superexec / flwr-serverapp / flwr-clientapp
# processes under them), and the simulation SuperLink that `flwr run flower local` leaves
# running in the background for this FLWR_HOME.
set -uo pipefail
. "$(dirname "$0")/flower-env.sh"
P=$FEDSEED_FLOWER_DIR/pids
stopped=0
tree() { local p; for p in $(pgrep -P "$1"); do echo "$p"; tree "$p"; done; }
gone() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 1; done; return 0; }
stop() {  # SIGTERM the given PIDs and all under them, wait up to 10 s for them, SIGKILL what is left
  local all=("$@") p
  for p in "$@"; do all+=($(tree "$p")); done
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null; done   # the whole tree: an orphaned superexec lingers ~5 s
  for _ in $(seq 1 20); do gone "${all[@]}" && break; sleep 0.5; done
  for p in "${all[@]}"; do  # only if still a Flower process: PIDs get reused
    ps -p "$p" -o args= 2>/dev/null | grep -qE "flower-|flwr-|fedseed (worker|fleet-gateway)" && kill -KILL "$p" 2>/dev/null
  done
  stopped=$((stopped + ${#all[@]}))
}
nodes=()
for f in "$P"/supernode*.pid; do [[ -f $f ]] && nodes+=("$(cat "$f")"); done
(( ${#nodes[@]} )) && stop "${nodes[@]}"                       # first the nodes: each deactivates itself
workers=()
for f in "$P"/worker*.pid "$P"/gateway.pid; do [[ -f $f ]] && workers+=("$(cat "$f")"); done
(( ${#workers[@]} )) && stop "${workers[@]}"                   # their resident workers, the fleet gateway
[[ -f $P/superlink.pid ]] && stop "$(cat "$P/superlink.pid")"   # then the SuperLink, its SuperExec and ServerApp
simulation=($(pgrep -f -- "--database $FLWR_HOME/local-superlink/state.db"))
(( ${#simulation[@]} )) && stop "${simulation[@]}"
rm -f "$P"/*.pid
echo "stopped $stopped Flower processes"
