#!/usr/bin/env bash
# GPU checks for a lent device machine (see README "GPU"): the test suite with `--device cuda`, the CLI on CUDA,
# and (when benchmarks/scale.py exists) the Qwen1.5-MoE-shaped fit timing. Needs the wheels listed in
# scripts/device_wheels.txt in .whl (the machine has CUDA torch/transformers but no registry).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)" | tee -a $OUT/gpu.txt
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --tb=line -rf --device cuda -n 4 ${TESTS:-tests} 2>&1 \
    | tail -n 150 > $OUT/pytest_cuda.txt
echo "pytest exit $?" >> $OUT/pytest_cuda.txt
tail -n 3 $OUT/pytest_cuda.txt
