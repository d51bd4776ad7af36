#!/usr/bin/env bash
# Session 8: score failed in graph capture (parked probes, group 2); finish it eager, then both distills at once,
# then eval of the distilled hybrids (no finetune: no time left).
set -u
R=$HOME/res; cd $(cat $R/repo_path)
export NANOHYBRID_CACHE=$HOME/nhc PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
c="--run_name=qwen --out_dir=out"
t "Q3 start"
python score.py $c --budget=0.25 --steps=60 --eval_every=10 --patience=3 --batch_size=8 --seq_len=1024 --steps=20 --eval_every=5 --patience=3 --graph=false > $R/Q3_score.log 2>&1; t "Q3 score rc=$?"
python select_layers.py $c --method=kl --budget=0.25 > $R/Q3_select.log 2>&1
python select_layers.py $c --method=uniform --budget=0.25 --out=selection_uniform.json >> $R/Q3_select.log 2>&1; t "Q3 select rc=$?"
D="--resume=true --steps=150 --batch_size=16 --seq_len=1024 --save_every=100 --valid_batches=16"
python distill.py $c $D > $R/Q3_distill.log 2>&1 &
python distill.py $c --selection=out/qwen/select/selection_uniform.json --out=distill_uniform $D > $R/Q3_distill_uniform.log 2>&1
wait; t "Q3 distill done"
python eval.py $c --models=out/qwen/distill/ckpt.pt,out/qwen/distill_uniform/ckpt.pt --batch_size=32 --speed_lengths=1024,4096,16384 > $R/Q3_eval.log 2>&1; t "Q3 eval rc=$?"
mkdir -p $R/qwen; cp -r out/qwen/logs $R/qwen/ 2>/dev/null; cp out/qwen/eval/* out/qwen/score/scores.json out/qwen/select/*.json $R/qwen/ 2>/dev/null
t "Q3 fin"
