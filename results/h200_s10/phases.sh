#!/usr/bin/env bash
# Session 10 (two H200s): parts gla_kl_25 (GPU 0) and gla_uniform_25 (GPU 1) of the study, each with its own Stage 1
# (separate OUT_DIRs: the same seed and tokens, so the same student up to the GPU's unordered sums).
set -u
R=$HOME/res; mkdir -p $R
cd $HOME/repo
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl; export PYTHONPATH=/tmp/site NANOHYBRID_CACHE=$HOME/nhc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DATA_SRC=$HOME/corpus RES=$R/study
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
t "start at $(git describe --always --dirty)"
nvidia-smi > $R/nvidia_smi.txt 2>&1
(OUT_DIR=$HOME/out0 CUDA_VISIBLE_DEVICES=0 bash results/reproduce.sh part gla_kl_25 > $R/S_gla_kl_25.log 2>&1; t "gla_kl_25 rc=$?") &
(OUT_DIR=$HOME/out1 CUDA_VISIBLE_DEVICES=1 bash results/reproduce.sh part gla_uniform_25 > $R/S_gla_uniform_25.log 2>&1; t "gla_uniform_25 rc=$?") &
wait
bash results/reproduce.sh status > $R/status.txt 2>&1
t "done"
