#!/usr/bin/env bash
# Runs an agent and a broker in front of it on this machine, with working
# defaults: the agent's API on 127.0.0.1:7070 (instances on ports
# 16000-16999), the broker's OSB API on 127.0.0.1:7080 with basic auth
# broker:$REDIS_BROKER_PASSWORD (default "broker-secret") and /admin as
# admin:$REDIS_BROKER_ADMIN_PASSWORD (default "admin-secret"). Ctrl-C stops
# both; the redis-servers keep running and the next agent adopts them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-bin}
export REDIS_BROKER_PASSWORD=${REDIS_BROKER_PASSWORD:-broker-secret}
export REDIS_BROKER_ADMIN_PASSWORD=${REDIS_BROKER_ADMIN_PASSWORD:-admin-secret}
agent_listen=${REDIS_AGENT_LISTEN:-127.0.0.1:7070}

"$bin/redis-agent" &
agent=$!
trap 'kill $agent 2>/dev/null; wait $agent 2>/dev/null' EXIT
for _ in $(seq 100); do
	curl -fsS "http://$agent_listen/readyz" >/dev/null 2>&1 && break
	kill -0 $agent 2>/dev/null || { echo "run-local: the agent exited" >&2; exit 1; }
	sleep 0.1
done
echo "run-local: agent ready on $agent_listen; broker on ${REDIS_BROKER_LISTEN:-127.0.0.1:7080} (broker:$REDIS_BROKER_PASSWORD)" >&2
"$bin/redis-broker" --agent "local=http://$agent_listen"
