#!/usr/bin/env bash
# Issue 17, GPU run at the design shape (one script, < 8 min on an H200): Qwen1.5-MoE-A2.7B-shaped checkpoint
# (24 x 60 experts, bf16, ~25 GB on local disk), the dry run's prediction on CUDA, the gate family fitted at
# r = p/2 = 704, m = 256 with the default hybrid warm start, a few AM iterations and variable-projection
# evaluations (wall time and peak CUDA memory per phase), the full model extrapolated, then fit + export + load +
# forward of a 1-layer loadable model with the same expert shapes. Everything lands in $OUT.
# Prepare here (the machine has CUDA torch/transformers but no registry): pip download --no-deps -d .whl entmax==1.3
# and carry .whl. Knobs: AM (AM iterations, 2), VP (L-BFGS iterations, 2), EXPORT_LAYERS (1; 0 skips), timeouts.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=16
D=/tmp/qwen15
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)" | tee -a $OUT/gpu.txt
[ -f $D/config.json ] || /usr/bin/time -f "make_upcycled: %e s" timeout ${GEN_TIMEOUT:-150} \
    python3 benchmarks/make_upcycled.py --out $D > $OUT/make_upcycled.txt 2>&1; tail -n 1 $OUT/make_upcycled.txt
python3 -m globe.cli.main fit $D -o $OUT/never_written --m 256 --r 704 --families gate --am-iters ${AM:-2} \
    --varpro-steps ${VP:-2} --device cuda --dry-run > $OUT/dry_run_cuda.txt 2>&1; tail -n 12 $OUT/dry_run_cuda.txt
timeout ${FIT_TIMEOUT:-360} python3 benchmarks/design_shape.py --checkpoint $D --device cuda --m 256 --r 704 \
    --am-iters ${AM:-2} --varpro-steps ${VP:-2} --export-model-layers ${EXPORT_LAYERS:-1} \
    --out $OUT/design_shape_cuda_h200.json > $OUT/design_shape.txt 2>&1; echo "design_shape exit $?"
tail -n 70 $OUT/design_shape.txt
