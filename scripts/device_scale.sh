#!/usr/bin/env bash
# GPU timing of a full Qwen1.5-MoE-A2.7B-shaped family (run after scripts/device_check.sh installed the wheels):
# synthetic upcycled checkpoint (24 x 60 experts, bf16, ~25 GB on local disk), then one family fitted on CUDA.
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=16
D=/tmp/qwen15_upcycled
/usr/bin/time -f "make_upcycled: %e s" timeout ${GEN_TIMEOUT:-240} python3 benchmarks/make_upcycled.py --out $D \
    > $OUT/make_upcycled.txt 2>&1; tail -n 2 $OUT/make_upcycled.txt
timeout ${FIT_TIMEOUT:-240} python3 benchmarks/scale.py --out $OUT/scale_cuda.json --fit $D --family gate --m 64 \
    --r 128 --am-iters 3 --varpro-steps 2 --device cuda > $OUT/scale_cuda.txt 2>&1; echo "scale exit $?"
tail -n 40 $OUT/scale_cuda.txt
