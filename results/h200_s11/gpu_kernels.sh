#!/usr/bin/env bash
# session 11: the chunk backward written out for registers (working tree) against the committed one (93bfee5)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
B=$OUT/bench_kernels.log
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv > $B; git describe --always --dirty >> $B
for gates in model trained; do
  for f in .carry/kv/kernels_committed.py kernels.py; do
    echo "== $f --gates=$gates" >> $B
    timeout 100 python $f --shapes=1,4 --fla=false --gates=$gates >> $B 2>&1
  done
done
cat $B
timeout 150 python -m pytest -q tests/test_kernels.py -k "mid or steady or alt or bfloat16" > $OUT/pytest_kernels.log 2>&1
tail -n 15 $OUT/pytest_kernels.log
