#!/usr/bin/env bash
# Session 8 (ONE H200; x2 not lent). Sequence: data -> bench distill+finetune eager, then graph (alone on the GPU:
# issue 13's rows, first measurement of the compiled teacher) -> then two lanes sharing the GPU:
#   A: run.sh (smollm2, 1 GPU) -> export --verify=on -> pytest export -k cuda   (issue 17)
#   Q: wait for the 10 Qwen files (9 parts + SHA256SUMS, one per poll) -> join -> Qwen run.sh with eval (issue 18)
set -u
R=$HOME/res; mkdir -p $R
cd $(cat $R/repo_path)
export NANOHYBRID_CACHE=$HOME/nhc PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
keep() { mkdir -p $R/$1; cp -r out/$1/logs $R/$1/ 2>/dev/null; cp out/$1/eval/* out/$1/score/scores.json out/$1/select/*.json $R/$1/ 2>/dev/null; }
t "start"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python data.py --run_name=benchdata --max_tokens=40000000 > $R/A_data.log 2>&1; t "data rc=$?"
D=out/benchdata/data
timeout 300 python bench_train.py --data_dir=$D --stages=distill,finetune --shapes=preset --steps=24 --extra=--graph=false --out_dir=out_bench0 --json=$R/bench_ft_eager.json > $R/B_bench_ft_eager.log 2>&1; t "bench eager rc=$?"
timeout 300 python bench_train.py --data_dir=$D --stages=distill,finetune --shapes=preset --steps=24 --out_dir=out_bench1 --json=$R/bench_ft_graph.json > $R/B_bench_ft_graph.log 2>&1; t "bench graph rc=$?"
( timeout 900 bash run.sh > $R/G0_runsh.log 2>&1; t "A runsh rc=$?"; keep smollm2
  timeout 200 python export.py --run_name=smollm2 --verify=on > $R/G0_export.log 2>&1; t "A export rc=$?"
  timeout 200 python -m pytest -q tests/test_export.py -k cuda > $R/G0_pytest_export.log 2>&1; t "A pytest export rc=$?"
  t "A done" ) &
( while [ $(ls $HOME/qparts 2>/dev/null | wc -l) -lt 10 ]; do sleep 5; done
  python fetch_qwen.py --join=$HOME/qparts > $R/Q_join.log 2>&1; t "Q join rc=$?"
  Q=$(tail -1 $R/Q_join.log)
  t "Q runsh start teacher=$Q"
  ALIGN_ARGS="--steps=150" SCORE_ARGS="--steps=20 --eval_every=5 --patience=3" DISTILL_ARGS="--steps=150" \
  FINETUNE_ARGS="--steps=150" EVAL_ARGS="--speed_lengths=1024,4096,16384" \
    timeout 1500 bash run.sh --teacher=$Q --baseline=uniform --run=qwen > $R/Q_runsh.log 2>&1; t "Q runsh rc=$?"; keep qwen
  t "Q done" ) &
wait; t "done"
