#!/usr/bin/env bash
# The prepared accelerator run of issue 25: our Newton-Schulz against optax's on one GPU/TPU, every
# result under $OUT, each part under its own timeout.  From the project root on the device machine:
#   OUT=/path WHEELS=wheels/ bash experiments/accelerator_newton_schulz.sh [SIZES] [REPEATS]
# The benchmark needs jax, flax and optax only; WHEELS (a folder of wheels, ../shared/docs/gpu.md)
# is installed into $OUT/../site first when given.  Tested on CPU:
#   OUT=/tmp/o bash experiments/accelerator_newton_schulz.sh tiny 1
set -u
OUT=${OUT:?set OUT to the results folder}
SIZES=${1:-150m,914m}
REPEATS=${2:-5}
LIMIT=${LIMIT:-300}  # seconds per part
export PYTHONUNBUFFERED=1  # a part stopped by its timeout keeps what it printed
mkdir -p "$OUT"
: > "$OUT/summary.txt"
part() {  # part NAME COMMAND...: its output in $OUT/NAME.txt, its exit status in $OUT/summary.txt
  local name=$1 start=$SECONDS
  shift
  timeout "$LIMIT" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" >> "$OUT/summary.txt"
}
if [ -n "${WHEELS:-}" ]; then
  site="$(dirname "$OUT")/site"
  part install python3 -m pip install --no-index --no-deps --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
part devices python3 -c "import jax; print(jax.__version__, jax.devices())"
for size in ${SIZES//,/ }; do
  for dtype in bfloat16 float32; do
    part "newton_schulz_${size}_$dtype" python3 -m muloco_jax.tools.benchmarks.newton_schulz \
      --sizes="$size" --dtype="$dtype" --repeats="$REPEATS"
  done
done
cat "$OUT/summary.txt"
