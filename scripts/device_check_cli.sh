#!/usr/bin/env bash
# GPU check of the CLI (fit/eval/export/bench with --device cuda on the embedded model), for a machine with
# CUDA torch + transformers: first `pip download --no-deps --only-binary=:all: -d .whl entmax==1.3` here, carry .whl.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch;print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())"
G="python3 -m globe.cli.main --log-level WARNING"
$G fit -o /tmp/art --device cuda --m 8 --r 16 --target-support 4 --am-iters 3 --varpro-steps 10 --json || exit 4
cp /tmp/art/globe_config.json /tmp/art/metrics.jsonl $OUT/
/usr/bin/time -f "fit default budget 0.5 on auto: %e s" $G fit -o /tmp/art_auto --device auto --json
$G eval --device cuda --globe /tmp/art --mode cached --max-tokens 4096 --json > $OUT/eval_cached.json || exit 5
$G eval --device cuda --globe /tmp/art --mode dense --max-tokens 4096 --no-speed --json > /tmp/e_dense.json
$G export /tmp/art --device cuda --dense -o /tmp/hf || exit 6
$G eval /tmp/hf --device cuda --max-tokens 4096 --no-speed --json > /tmp/e_hf.json
python3 - <<'PY'
import json
a, b = json.load(open("/tmp/e_dense.json")), json.load(open("/tmp/e_hf.json"))
for n, r in (("dense mode", a), ("dense export", b)):
    print(n, r["model"]["device"], r["model"]["dtype"], r["perplexity"]["perplexity"], r["memory"])
PY
$G bench --device cuda --globe /tmp/art --modes cached factored dense --max-tokens 2048 -o $OUT/bench.json
python3 -m pytest -q -p no:cacheprovider tests/test_device.py
