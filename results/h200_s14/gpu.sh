#!/usr/bin/env bash
# GPU glue of session 14 (not part of the project). setup1: the first teacher part and the corpus. setup2: the rest
# of the teacher, then phases.sh started (GLA parts alone on the GPU: no kernel tests beside them, so their times
# are the kernel's). poll N: waits up to N s (returns early when a part finishes) and sends $HOME/res back via $OUT.
set -u
R=$HOME/res
case $1 in
  setup1)
    mkdir -p $HOME/parts $HOME/corpus $R && cp .carry/t1/gg.* $HOME/parts/ && cp .carry/t1/corpus/* $HOME/corpus/ &&
    nvidia-smi --query-gpu=name,clocks.sm,power.draw,memory.used --format=csv; git describe --always --dirty ;;
  setup2)
    cp .carry/t2/gg.* $HOME/parts/ 2>/dev/null; mkdir -p $HOME/nhc &&
    cat $HOME/parts/gg.* > $HOME/nhc/SmolLM2-135M-Instruct.Q4_1.gguf &&
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $HOME/nhc/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
    rm -rf $R/timeline.txt $R/S_*.log $R/study $HOME/repo && mkdir -p $HOME/repo && cp -a . $HOME/repo/ && rm -rf $HOME/repo/.carry/t1 $HOME/repo/.carry/t2
    mkdir -p $R/study && cp -r results/study/* $R/study/
    (cd $HOME/repo && git describe --always --dirty)
    setsid nohup bash $HOME/repo/.carry/sh/phases.sh > $R/phases.out 2>&1 < /dev/null &
    sleep 45; cat $R/timeline.txt; tail -n 3 $R/S_*.log ;;
  poll)
    n0=$(ls $R/study/*/done 2>/dev/null | wc -l); t0=$SECONDS
    while [ $((SECONDS - t0)) -lt ${2:-540} ]; do
      sleep 10
      grep -q " done$" $R/timeline.txt 2>/dev/null && break
      [ "$(ls $R/study/*/done 2>/dev/null | wc -l)" != "$n0" ] && break
    done
    cat $R/timeline.txt; for f in $R/S_*.log; do echo "== $f"; tail -n 4 $f; done
    for d in $R/study/*/; do [ -f $d/done ] && continue; echo "== $d"; cat $d/times.txt 2>/dev/null; done
    for l in $(ls -t $R/study/*/logs/*.log 2>/dev/null | head -2); do echo "== $l"; tail -n 2 $l; done
    tail -n 2 $R/study/*/gpu.csv 2>/dev/null
    tar czf $OUT/res.tgz -C $HOME res 2>/dev/null; ls -la $OUT ;;
esac
