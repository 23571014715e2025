#!/usr/bin/env bash
# Make sure a Redis answers on ${REDIS_HOST:-127.0.0.1}:${REDIS_PORT:-6379} for the test suite:
# use the one running, else start redis-server (installing Debian's package if missing).
set -euo pipefail
host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}

ping() {
  python3 - "$host" "$port" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    s.sendall(b"PING\r\n")
    ok = s.recv(16).startswith(b"+PONG")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if ping; then echo "redis: reachable on $host:$port"; exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: not installed; installing Debian's redis-server"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "redis: starting redis-server on $host:$port (no persistence)"
dir=$(mktemp -d)
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no --dir "$dir" \
  --logfile "$dir/redis.log"
for _ in $(seq 1 50); do ping && { echo "redis: up"; exit 0; }; sleep 0.1; done
echo "redis: failed to start, see $dir/redis.log" >&2
exit 1
