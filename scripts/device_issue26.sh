#!/usr/bin/env bash
# Issue 26 on a lent GPU, in ONE command of at most ~9 minutes (README "GPU (issue 26)"): a loadable
# Qwen1.5-MoE-A2.7B-shaped model of LAYERS layers (d 2048, 60 experts x 1408 rows, top-4, shared expert 5632,
# 16 heads, vocab 151936, bf16) built on the device, then benchmarks/gpu_real_shape.py's steps, each in its own
# process with its own time limit, all writing $OUT/gpu_real_shape.json (saved after every phase: a step stopped by
# its limit leaves what it measured) and appending to $OUT/log.txt:
#   build     the model (random init, routed experts and routers as benchmarks/make_upcycled.py makes them)
#   short     globe compress at the defaults with few iterations of the iterative phases: every phase's cost,
#             the per-iteration costs, the 24-layer extrapolation; its checkpoint serves the decode timing
#   decode    tokens/s and peak memory, original vs compressed (default runtime mode, bf16), batch 1 and 16
#   mobe      MoBE's recipe on layer 0's gate and up at GloBE's parameters: seconds per layer at the authors' epochs
#   dryrun    the dry run's prediction on the L-layer model and on the full 24-layer shape
#   compress  globe compress with every default, for the rest of the time (stopped at the limit: partial phases)
#   report    the issue's numbers beside its goals
# then the GPU test subset (scripts/device_check.sh, TESTS) only if at least TESTS_MIN seconds remain.
# Prepare here (the device has CUDA torch/transformers but no registry): the wheels of scripts/device_wheels.txt in
# .whl (carry .whl). Knobs (environment): LAYERS (1), TOTAL (seconds for everything, 530), DEVICE (cuda),
# <STEP>_TIMEOUT (BUILD 90, SHORT 240, DECODE 120, MOBE 120, DRYRUN 60, COMPRESS 600: capped by what is left),
# SHAPE (extra driver options, e.g. the CPU test's tiny shape), TESTS ("tests/fit/engine/test_phases.py
# tests/eval tests/runtime"), TESTS_MIN (150).
set -o pipefail
TOTAL=${TOTAL:-530}
OUT=${OUT:?set OUT (the device run sets it)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/issue26}
JSON=$OUT/gpu_real_shape.json
LOG=$OUT/log.txt
ARGS="--work $WORK --json $JSON --layers ${LAYERS:-1} --device $DEVICE ${SHAPE:-}"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
fi
python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)" \
    | tee -a $LOG

# step NAME LIMIT RESERVE: the driver's step NAME with a time limit of min(LIMIT, what is left - RESERVE seconds
# kept for the steps after it); skipped under 15 s
step() {
    local name=$1 limit=$2 reserve=$3 t start rc
    t=$(( TOTAL - SECONDS - reserve ))
    (( t > limit )) && t=$limit
    if (( t < 15 )); then
        echo "step $name: skipped (${t} s left for it)" | tee -a $LOG
        return
    fi
    echo "=== step $name (limit ${t} s, at ${SECONDS} s)" >> $LOG
    start=$SECONDS
    timeout -k 15 $t python3 benchmarks/gpu_real_shape.py $name $ARGS >> $LOG 2>&1
    rc=$?
    echo "step $name: exit $rc after $(( SECONDS - start )) s (limit ${t} s)" | tee -a $LOG
}

step build    ${BUILD_TIMEOUT:-90}     380
step short    ${SHORT_TIMEOUT:-240}    210
step decode   ${DECODE_TIMEOUT:-120}   120
step mobe     ${MOBE_TIMEOUT:-120}     60
step dryrun   ${DRYRUN_TIMEOUT:-60}    40
step compress ${COMPRESS_TIMEOUT:-600} 25
step report   25                       0
left=$(( TOTAL - SECONDS ))
if [ "$DEVICE" = cuda ] && (( left >= ${TESTS_MIN:-150} )); then
    TESTS=${TESTS:-"tests/fit/engine/test_phases.py tests/eval tests/runtime"} TEST_TIMEOUT=$(( left - 20 )) \
        bash scripts/device_check.sh
else
    echo "GPU tests: skipped (${left} s left, device $DEVICE)" | tee -a $LOG
fi
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r.get('report'), indent=1))" $JSON
