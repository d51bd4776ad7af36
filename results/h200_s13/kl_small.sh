#!/usr/bin/env bash
# Session 13, by hand after phases.sh (the run tool's command; $OUT was the machine's return folder): part
# gla_kl_small from the GLA Stage 1 on the machine, in the session's last ~450 device-seconds. It was cut during
# eval_kl_50 when the device time ran out; kl_12 finished and is kept by the part's next run.
cd $HOME/repo && cat > /tmp/p2.sh <<'EOS'
set -u
R=$HOME/res; cd $HOME/repo
export PYTHONPATH=/tmp/site NANOHYBRID_CACHE=$HOME/nhc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DATA_SRC=$HOME/corpus RES=$R/study
echo "$(date +%T) $(date +%s) gla_kl_small start (the last ~450 device-s)" >> $R/timeline.txt
OUT_DIR=$HOME/out0 bash results/reproduce.sh part gla_kl_small > $R/S_gla_kl_small.log 2>&1; echo "$(date +%T) $(date +%s) gla_kl_small rc=$?" >> $R/timeline.txt
EOS
setsid nohup bash /tmp/p2.sh > /dev/null 2>&1 < /dev/null &
sleep 5; R=$HOME/res; t0=$SECONDS
while [ $((SECONDS - t0)) -lt 395 ]; do sleep 10; grep -q "gla_kl_small rc" $R/timeline.txt && break; done
cat $R/timeline.txt; cat $R/S_gla_kl_small.log | tail -5; cat $R/study/gla_kl_small/times.txt; for l in $(ls -t $R/study/gla_kl_small/logs/*.log | head -2); do echo "== $l"; tail -n 2 $l; done
tar czf $OUT/res.tgz -C $HOME res; ls -la $OUT
