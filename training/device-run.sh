#!/bin/sh
# One device call for issue 22: tokenize the carried corpus, train every RECIPE x SIZE at once on the
# GPU until a shared deadline, then pack what must come back within the device's 8-file limit:
# logs.tar (every results.json and train.log) and the weights of the recipe whose P = 8 beats its
# control by most on held-out set 1 (or every recipe's, WEIGHTS=all) (split into 15 MB parts: weights.tar.xz.part-*).
# Usage: sh training/device-run.sh SECONDS OUT "RECIPE..." "SIZE..."   (RECIPE "base" = no overrides)
# TRAIN_ARGS (env): more arguments for every `dynamic.py train`, e.g. "--max-steps 3289".
# WEIGHTS=all (env): bring back every recipe's weights instead of the best one's.
set -u
SECONDS_TOTAL=$1; OUT=$2; RECIPES=$3; SIZES=$4
END=$(( $(date +%s) + SECONDS_TOTAL ))
W=/tmp/w; export PYTHONUNBUFFERED=1
python3 training/dynamic.py prepare --corpus .carry/corpus/corpus.tar.xz --work $W > $OUT/prepare.log 2>&1 || { tail $OUT/prepare.log; exit 1; }
cp $W/prepare.json $OUT/ 2>/dev/null
R=/tmp/runs; mkdir -p $R
for r in $RECIPES; do for z in $SIZES; do
  opt=""; [ "$r" = base ] || opt="--recipe $r"
  python3 training/dynamic.py train --work $W --size $z $opt --out $R/$r --end-by $END ${TRAIN_ARGS:-} > $R/$r-$z.out 2>&1 &
done; done
wait
grep -h "eval\|heldout\|trained" $R/*.out
best=$(python3 - "$R" <<'PY'
import json, os, sys
root = sys.argv[1]; best = (-9, None)
for r in sorted(os.listdir(root)):
    d = os.path.join(root, r)
    if not os.path.isdir(d): continue
    m = [json.load(open(os.path.join(d, z, "results.json")))["eval"] for z in os.listdir(d)
         if os.path.exists(os.path.join(d, z, "results.json"))]
    m = [e["control"]["heldout"]["nll"] - e["p8"]["heldout"]["nll"] for e in m if "control" in e]
    if m and min(m) > best[0]: best = (min(m), r)
print(best[1])
PY
)
echo "best recipe: $best"
(cd $R && tar cf $OUT/logs.tar *.out */*/results.json */*/train.log)
# WEIGHTS=all (env): every recipe's weights come back, not only the best one's (small sizes fit the file limit)
for r in $( [ "${WEIGHTS:-best}" = all ] && echo $RECIPES || echo $best ); do
  (cd $R/$r && tar cf - */weights-*.safetensors | xz -T0 -3) | split -b 15000000 - $OUT/weights-$r.tar.xz.part-
done
ls -la $OUT
