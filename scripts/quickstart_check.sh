#!/usr/bin/env bash
# The README's quick start, as a user types it, on a tiny run: `make serve` trains the run and serves it,
# a real POST /rerank is answered, the service stops on SIGTERM. CI runs this after the suite
# (.ci/run), so a quick start that breaks (a console script not on PATH, a missing install step, a
# service that does not come up) fails CI instead of a new user.
#
#   bash scripts/quickstart_check.sh            # CONFIG=tiny, a fresh run in a temporary directory
#   RUN=runs/tiny PORT=8123 bash scripts/quickstart_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-tiny}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
WORK=$(mktemp -d)
RUN=${RUN:-$WORK/run}
LOG=$WORK/serve.log
WAIT_S=${WAIT_S:-1800}  # training the tiny run (minutes) + engine start (~1 min)
start=$(date +%s)

# On pyenv a console script pip has just installed is not on PATH until `pyenv rehash`: a `dpo4rec` first
# on PATH that fails stands for that, so the quick start must not depend on the shell finding the script.
mkdir -p "$WORK/bin"
printf '#!/bin/sh\necho "dpo4rec: not found (quickstart_check: call python -m dpo4rec)" >&2; exit 127\n' >"$WORK/bin/dpo4rec"
chmod +x "$WORK/bin/dpo4rec"
# BACKGROUND_CONFIG empty: no default run training behind the check (tests/service/test_background.py covers it)
setsid env PATH="$WORK/bin:$PATH" make serve RUN="$RUN" CONFIG="$CONFIG" PORT="$PORT" PYTHON="$PYTHON" \
  BACKGROUND_CONFIG= >"$LOG" 2>&1 &
pid=$!
stop() {
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  echo "quickstart: the service did not stop within 60 s of SIGTERM" >&2
  kill -KILL -- "-$pid" 2>/dev/null || true
  return 1
}
fail() {
  echo "quickstart: $1" >&2
  tail -40 "$LOG" >&2
  stop || true
  exit 1
}

until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do
  kill -0 "$pid" 2>/dev/null || fail "make serve exited before the service was ready"
  [ $(($(date +%s) - start)) -lt "$WAIT_S" ] || fail "not ready after ${WAIT_S} s"
  sleep 5
done
ready=$(($(date +%s) - start))

# A user of the run, and a new user known only by the history the request gives.
user=$("$PYTHON" -c 'import sys; from rundir.reader import read_users; print(next(iter(read_users(sys.argv[1]))))' "$RUN")
for body in "{\"user_id\": \"$user\", \"top_n\": 5, \"return_items\": true}" \
  '{"user_id": "quickstart-new-user", "history": ["50", "172", "181"], "top_n": 5}'; do
  answer=$(curl -s -w '\n%{http_code}' "http://127.0.0.1:$PORT/rerank" -H 'content-type: application/json' -d "$body")
  code=$(echo "$answer" | tail -1)
  [ "$code" = 200 ] || fail "POST /rerank $body -> HTTP $code: $(echo "$answer" | head -1)"
  echo "$answer" | head -1 | "$PYTHON" -c '
import json, sys
doc = json.load(sys.stdin)
assert len(doc["results"]) == 5, doc
assert doc["model_version"], doc
print("quickstart: answered", [r["item_id"] for r in doc["results"]], "version", doc["model_version"], "degraded", doc["degraded"])
' || fail "unexpected answer to $body"
done
stop || fail "no clean stop"
echo "quickstart: make serve (CONFIG=$CONFIG) answered POST /rerank ${ready} s after it started; stopped cleanly"
rm -rf "$WORK"
