#!/usr/bin/env bash
# The prepared accelerator run of issue 25: our Newton-Schulz against optax's on one GPU/TPU, every
# result under $OUT, each part under its own timeout.  From the project root on the device machine:
#   OUT=/path WHEELS=wheels/ bash experiments/accelerator_newton_schulz.sh [SIZES] [REPEATS]
# WHEELS (optional): a folder of the wheels the machine lacks (../shared/docs/gpu.md), installed
# into $OUT/../site first.  Tested on CPU: `OUT=/tmp/o bash experiments/accelerator_newton_schulz.sh tiny 1`.
set -u
OUT=${OUT:?set OUT to the results folder}
SIZES=${1:-150m,914m}
REPEATS=${2:-5}
LIMIT=${LIMIT:-240}  # seconds per part
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  site="$(dirname "$OUT")/site"
  python3 -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl > "$OUT/install.txt" 2>&1
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
part() {  # part NAME COMMAND...: its output in $OUT/NAME.txt, its exit status in $OUT/summary.txt
  local name=$1 start=$SECONDS
  shift
  timeout "$LIMIT" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" >> "$OUT/summary.txt"
}
part devices python3 -c "import jax; print(jax.__version__, jax.devices())"
for dtype in bfloat16 float32; do
  part "newton_schulz_$dtype" python3 -m muloco_jax.tools.benchmarks.newton_schulz \
    --sizes="$SIZES" --dtype="$dtype" --repeats="$REPEATS"
done
cat "$OUT/summary.txt"
