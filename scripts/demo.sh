#!/usr/bin/env bash
# The main job on the built-in CDNOW data: summary -> train -> export -> serve -> query -> report.
set -euo pipefail
BIN=.venv/bin
RUN=${DEMO_DIR:-outputs/demo}
REPO=$RUN/model_repository
rm -rf "$RUN" && mkdir -p "$RUN"

echo "== 1. data"
$BIN/fintwin data summary cdnow

echo "== 2. train (LSTM twin on CDNOW, calibration weeks 1-39)"
$BIN/python train.py hydra.run.dir="$RUN/train"

CKPT="$RUN/train/$($BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$RUN/train/metrics.json")"

echo "== 3. export the selected checkpoint ($CKPT) to a Triton model repository"
$BIN/fintwin export --ckpt "$CKPT" --repo "$REPO" --name cdnow

echo "== 4. serve with the embedded Triton server and query it over gRPC"
read -r HTTP GRPC METRICS < <($BIN/python -c "
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
$BIN/fintwin serve --repo "$REPO" --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
$BIN/python - "$HTTP" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready"
for _ in range(240):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("the Triton server did not become ready within 120 s")
PY
$BIN/python -c "
from fintwin.data.sources import load_events
events, _ = load_events('cdnow')
first = events['customer_id'].unique()[:1000]
events[events['customer_id'].isin(first) & (events['timestamp'] <= '1997-09-30')].to_csv('$RUN/query_events.csv', index=False)"
$BIN/fintwin predict --url "127.0.0.1:$GRPC" --protocol grpc --model cdnow \
    --events "$RUN/query_events.csv" --out "$RUN/predictions.parquet"
$BIN/python -c "import pandas as pd; print(pd.read_parquet('$RUN/predictions.parquet').head(5).T)"
kill -TERM $SERVER; wait $SERVER || true; trap - EXIT

echo "== 5. twin forecasts vs BG/NBD on the holdout (weeks 40-78)"
$BIN/fintwin report --ckpt "$CKPT" --data cdnow --cutoff 1997-09-30 \
    --holdout-end 1998-06-30 --out "$RUN/report"
echo "demo done: $RUN (report: $RUN/report/report.html)"
