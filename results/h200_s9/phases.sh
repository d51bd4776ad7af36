#!/usr/bin/env bash
# Session 9+ (one H200): the score-pool fix's GPU test first, then the study's next part (issue 19; ~16 GPU-min).
# Start with: cp .carry/sh/phases_study.sh .carry/sh/phases.sh before setup2 (setup2 starts phases.sh).
set -u
R=$HOME/res; mkdir -p $R
cd $(cat $R/repo_path)
export NANOHYBRID_CACHE=$HOME/nhc PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
t "start"
timeout 240 python -m pytest -q tests/test_score.py -k graph > $R/A_pytest_score_graph.log 2>&1; t "pytest score graph rc=$?"
echo "data stage of the study part" > $R/A_data.log
timeout 1500 bash results/reproduce.sh next 1 > $R/S_next.log 2>&1; t "study next 1 rc=$?"
cp -r results/study $R/ 2>/dev/null
t "done"
