#!/usr/bin/env bash
# session 10: the GLA kernel's sub-chunk path for strongly decaying chunks, against the old exact loop, on the GPU
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv > $OUT/bench_kernels.log
git describe --always --dirty >> $OUT/bench_kernels.log
for gates in trained model; do
  for f in .carry/kv/kernels_old.py .carry/kv/kernels_a.py kernels.py; do
    echo "== $f --gates=$gates" >> $OUT/bench_kernels.log
    timeout 90 python $f --shapes=1,4 --fla=false --gates=$gates >> $OUT/bench_kernels.log 2>&1
  done
done
cat $OUT/bench_kernels.log
timeout 200 python -m pytest -q tests/test_kernels.py > $OUT/pytest_kernels.log 2>&1
grep -E "Error: |passed|failed" $OUT/pytest_kernels.log | tail -12
