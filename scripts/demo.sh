#!/usr/bin/env bash
# Set up, start a worker on the bundled model, stream one answer with the client, stop the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port="${PORT:-8000}"
log=$(mktemp)
.venv/bin/python -m uvicorn worker:app --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
worker=$!
# uvicorn re-raises SIGTERM after a clean shutdown, so the worker's 143 is not the demo's failure.
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  grep -q "Model loaded successfully! Ready for inference." "$log" && break
  kill -0 $worker 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
grep -q "Model loaded successfully! Ready for inference." "$log" || { cat "$log" >&2; exit 1; }
echo "worker ready on http://127.0.0.1:$port" >&2
.venv/bin/python client.py --url "http://127.0.0.1:$port" "$@"
