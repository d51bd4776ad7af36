#!/usr/bin/env bash
# Session 12's last call (one H200, after phases.sh had finished both GDN parts; nothing else on the GPU): GLA's
# Stage 1 of the study (the same data, seed, steps and shape as part score_gla's) on the tree of afac3e0 (the
# machine's git: 650397d), in $HOME/repo as setup2 left it, to time the sub-chunk GLA kernel inside a stage. The
# device tool reported wall 204.9 s for the call (data, transfer, Stage 1) and the lease's held time 1455.6 -> 1669.5 s.
cd $HOME/repo && export PYTHONPATH=/tmp/site NANOHYBRID_CACHE=$HOME/nhc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 &&
cp $HOME/res/phases.out $OUT/ 2>/dev/null
python data.py --run_name=study_gla --out_dir=$HOME/out0 --teacher= --data=$HOME/corpus --max_tokens=100000000 > $OUT/data_gla.log 2>&1 &&
python transfer.py --run_name=study_gla --out_dir=$HOME/out0 --teacher= --mixer=gla > $OUT/transfer_gla.log 2>&1 &&
timeout 215 python align.py --run_name=study_gla --out_dir=$HOME/out0 --steps=1526 --batch_size=8 --seq_len=4096 --save_every=200 > $OUT/align_gla.log 2>&1
tail -n 4 $OUT/align_gla.log; nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv
