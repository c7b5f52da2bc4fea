# Source me (`. scripts/flower-env.sh`): the environment every Flower command in docs/distributed.md needs.
#
# FEDSEED_FLOWER_DIR  where the loopback scripts keep pids/, logs/, certs/ and each node's cache
#                     (default /tmp/fedseed-flower)
# FLOWER_PORT         the SuperLink's one port: Fleet, Control and Runtime APIs (default 8000)
# FLOWER_NODE_PORT    SuperNode i serves its ClientApps on FLOWER_NODE_PORT + i (default 9094)
# FLOWER_GATEWAY_PORT the fleet gateway's port on 127.0.0.2, the loopback stand-in for a public address
#                     (default FLOWER_PORT + 1)
# FLWR_HOME           Flower's CLI home: connections (config.toml), installed apps
#                     (default $FEDSEED_FLOWER_DIR/flwr-home)
_fedseed_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: the venv must be on PATH.
. "$_fedseed_repo/.venv/bin/activate"
export FEDSEED_FLOWER_DIR=${FEDSEED_FLOWER_DIR:-/tmp/fedseed-flower}
export FLOWER_PORT=${FLOWER_PORT:-8000}
export FLOWER_NODE_PORT=${FLOWER_NODE_PORT:-9094}
export FLOWER_GATEWAY_PORT=${FLOWER_GATEWAY_PORT:-$((FLOWER_PORT + 1))}
export FLWR_TELEMETRY_ENABLED=0                    # no telemetry POSTs to flower.ai
export FLWR_DISABLE_UPDATE_CHECK=1                 # no update check over the network
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # fedseed and torch are installed; never `uv sync` a run
if [[ -z ${FLWR_HOME:-} ]]; then
  export FLWR_HOME=$FEDSEED_FLOWER_DIR/flwr-home
  rm -f "$FLWR_HOME/config.toml"                   # ours: rewritten for the current ports
fi
mkdir -p "$FLWR_HOME" "$FEDSEED_FLOWER_DIR"/{pids,logs,nodes}
if [[ ! -f $FLWR_HOME/config.toml ]]; then
  cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]          # flwr run flower loopback ...
address = "127.0.0.1:$FLOWER_PORT"
insecure = true

[superlink.loopback-tls]      # TLS=1 scripts/flower-start.sh; flwr run flower loopback-tls ...
address = "127.0.0.1:$FLOWER_PORT"
root-certificates = "$FEDSEED_FLOWER_DIR/certs/ca.crt"

[superlink.gateway]           # what a stranger reaches through the fleet gateway (GATEWAY=1): not the Control API
address = "127.0.0.2:$FLOWER_GATEWAY_PORT"
root-certificates = "$FEDSEED_FLOWER_DIR/certs/ca.crt"

[superlink.local]             # Ray simulation: flwr run flower local ...
address = ":local:"
TOML
fi
unset _fedseed_repo
