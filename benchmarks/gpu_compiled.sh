#!/usr/bin/env bash
# The GPU measurements of the host-light step issue (23), in one call: eager against eager SGDM and
# compiled (reduce-overhead: CUDA graphs) against compiled SGDM, for the modes the targets name.
# Run from the repository root on the GPU machine; results under $OUT (default: gpu-out/). Nothing is
# installed: the machine's own torch and timm run the checkout through PYTHONPATH.
#
#   bash benchmarks/gpu_compiled.sh           # DEVICE=cpu QUICK=1 for a dry run of the script itself
#
# 1. resnet18_cifar, batch 128 (the paper's; host-bound): GNB ¼ and finite-difference rowsum, every 1
#    and every 10 steps (the recipes' default is GNB ¼ every 10), eager and compiled.
# 2. resnet18_cifar, batch 1024 (GPU-bound): the same.
# 3. resnet50 at 224 px, batch 64: the same.
# 4. Diagnostics: a short compiled training run with dynamo's perf hints (CUDA-graph skips) and recompiles.
# Each step is bounded by `timeout`, in order of importance, so a short device lease keeps what finished.
set -u -o pipefail
MODE=${MODE:-reduce-overhead}
source "$(dirname "$0")/gpu_env.sh"  # OUT, DEVICE, QUICK, PYTHONPATH, sgdph, machine.txt

modes=(--every 1,10 --only 'sgdph gnb, batch x 0.25, every*' --only 'sgdph rowsum, finite_difference, every*')
if [ "$QUICK" = 1 ]; then
  sizes=("small_cnn 8 16 240")
  steps=(--steps 10 --rounds 1)
else
  # seconds each: compilation (the first compiled mode ~a minute; later ones hit inductor's cache) included
  sizes=("resnet18_cifar 128 32 300" "resnet18_cifar 1024 32 200" "resnet50 64 224 200")
  steps=(--steps 30 --rounds 1)
fi

for size in "${sizes[@]}"; do
  read -r model batch img limit <<<"$size"
  name="${model}_b${batch}"
  echo "== $name: eager and compiled ($MODE) =="
  timeout "$limit" "${sgdph[@]}" bench --device "$DEVICE" --model "$model" --batch "$batch" --img-size "$img" \
    "${modes[@]}" "${steps[@]}" --compile "$MODE" --json "$OUT/bench_${name}.json" 2>&1 | tee "$OUT/bench_${name}.log"
done

# 4. Why a compiled graph would not replay as a CUDA graph (skips, recompiles, pending backwards): one
#    epoch of the quickstart recipe (GNB ¼ every 10) compiled with $MODE, dynamo's hints logged.
echo "== diagnostics: quickstart, compiled ($MODE) =="
TORCH_LOGS=perf_hints,recompiles timeout "${DIAG_LIMIT:-120}" "${sgdph[@]}" train recipes/quickstart.yaml \
  trainer.device="$DEVICE" trainer.compile=true trainer.compile_mode="$MODE" trainer.epochs=2 trainer.progress=false \
  trainer.output_dir="$OUT/runs" trainer.name=compiled-diagnostics >"$OUT/diagnostics.log" 2>&1
grep -E '^epoch|cudagraph|Recompiling|skipping' "$OUT/diagnostics.log" | head -n 40
rm -rf "$OUT/runs"
