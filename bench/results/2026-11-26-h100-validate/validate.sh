#!/usr/bin/env bash
# One short GPU check of this session's changes: tests, host overhead, model rows. Usage: bash bench/results/2026-11-26-h100-validate/validate.sh OUT
OUT=$1; mkdir -p "$OUT"; R=$PWD; S=/tmp/sv; rm -rf $S; mkdir -p $S/flashvit
for e in flashvit/*; do ln -s $R/$e $S/flashvit/; done
ln -s $R/kernels $S/flashvit/kernels; ln -s $R/vit $S/flashvit/vit; ln -s $R/bench $S/flashvit/bench; ln -s $R/tests $S/tests
ln -s $R/pytest.ini $S/pytest.ini
cd $S; export PYTHONPATH=$S PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
T0=$SECONDS
timeout -s INT 80 python3 -m pytest -q -rfE -p no:cacheprovider -n 8 -m gpu tests/test_attention.py tests/test_dispatch.py \
  tests/test_layernorm.py > $OUT/tests.log 2>&1; echo "tests rc=$? $((SECONDS-T0))s"; tail -5 $OUT/tests.log
timeout 45 python3 -m flashvit.bench overhead --out $OUT/ovh --no-plot > $OUT/overhead.log 2>&1; echo "overhead rc=$? $((SECONDS-T0))s"
timeout 75 python3 -m flashvit.bench model --models s b --impls flashvit flashvit-eager timm --steps 10 --out $OUT/model \
  --no-plot > $OUT/model.log 2>&1; echo "model rc=$? $((SECONDS-T0))s"
grep -h "x base\|flashvit \|eager \|timm " $OUT/overhead.log | tail -32; tail -16 $OUT/model.log
