#!/usr/bin/env bash
# Session 14 (one H200): part gla_kl_small (Stage 1 again, then resumes at kl_50), then gla_ga_s1_small and
# gla_uniform_small from the Stage 1 it leaves (one OUT_DIR).
set -u
R=$HOME/res; mkdir -p $R
cd $HOME/repo
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl; export PYTHONPATH=/tmp/site NANOHYBRID_CACHE=$HOME/nhc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DATA_SRC=$HOME/corpus RES=$R/study
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
t "start at $(git describe --always --dirty)"
nvidia-smi > $R/nvidia_smi.txt 2>&1
for p in gla_kl_small gla_ga_s1_small gla_uniform_small; do
  OUT_DIR=$HOME/out0 bash results/reproduce.sh part $p > $R/S_$p.log 2>&1; rc=$?; t "$p rc=$rc"
  [ $rc = 0 ] || break
done
bash results/reproduce.sh status > $R/status.txt 2>&1
t "done"
