#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, which CI does not have: tests/test_cuda.py, the notebooks' `cuda` cells, and `wmtp bench` on
# CUDA (loss paths with torch's and Liger's fused losses, decoding on memorised text and on real code). Run it from the repository
# root on a machine with a GPU; what it finds goes to $OUT (default ./gpu-checks). Wheels in .whl/ (packages that machine lacks,
# downloaded elsewhere for its Python) are installed first, into /tmp/site.
set -uo pipefail
OUT=${OUT:-gpu-checks}; mkdir -p "$OUT"
export PYTHONPATH=$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
start=$(date +%s); fails=0
python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"; [ "${PIPESTATUS[0]}" = 0 ] || fails=$((fails + 1))
echo "tests: $(( $(date +%s) - start )) s"
# 07a_callbacks imports mlflow: its cuda cell runs where mlflow is installed (carry its wheels, about 37 MB, in place of .whl's)
default_nbs="01_loss 02_policy 05_checkpoint$(python3 -c 'import mlflow' 2>/dev/null && echo ' 07a_callbacks')"
for nb in ${GPU_NOTEBOOKS:-$default_nbs}; do
  timeout 300 nbdev_test --flags cuda --path "nbs/$nb.ipynb" >/tmp/nbdev.log 2>&1; rc=$?
  { cat /tmp/nbdev.log; echo "nbdev_test --flags cuda nbs/$nb.ipynb: exit $rc"; } >>"$OUT/nbdev_cuda.log"
  echo "nbdev_test --flags cuda nbs/$nb.ipynb: exit $rc"; [ $rc = 0 ] || { fails=$((fails + 1)); tail -n 30 /tmp/nbdev.log; }
done
echo "notebooks: $(( $(date +%s) - start )) s"
python3 -m wmtp.cli bench --device cuda --only ${GPU_BENCH:-loss_paths decoding real_code} --out /tmp/gpu-bench >"$OUT/bench.log" 2>&1 || fails=$((fails + 1))
cp /tmp/gpu-bench/bench.md /tmp/gpu-bench/bench.json "$OUT/" 2>/dev/null; tail -n 60 "$OUT/bench.log"
echo "all: $(( $(date +%s) - start )) s, $fails failed"
exit $fails
