#!/usr/bin/env bash
# What a session lent a GPU measures, in one call (docs/benchmarks.md, "GPU"). Run from the repository
# root on the GPU machine; results under $OUT (default: gpu-out/). Nothing is installed: the machine's
# own torch and timm run the checkout through PYTHONPATH.
#
#   bash benchmarks/gpu_session.sh            # DEVICE=cpu QUICK=1 for a dry run of the script itself
#
# 1. `sgdph bench` on resnet18_cifar, batch 128: every mode against SGDM, 2 interleaved rounds.
# 2. Training on the device through the project's trainer: the shapes net with SGDM and with SGD-PH
#    (GNB from a quarter of the batch, normalized rule; and the paper's autograd rowsum), and a ViT
#    (fused attention) with the autograd engine and with GNB; two epochs each (the log shows
#    images/s per epoch), bf16 autocast once.
set -u -o pipefail
source "$(dirname "$0")/gpu_env.sh"  # OUT, DEVICE, QUICK, PYTHONPATH, sgdph, machine.txt

if [ "$QUICK" = 1 ]; then
  bench_args=(--batch 8 --steps 1 --only 'sgdph gnb*every 1')
  train_args=(trainer.epochs=1 data.num_train=512 data.num_test=256)
else
  bench_args=(--batch 128 --steps 30 --rounds 2)
  train_args=(trainer.epochs=2)
fi

echo "== 1. sgdph bench (resnet18_cifar) =="
timeout 360 "${sgdph[@]}" bench --device "$DEVICE" "${bench_args[@]}" --json "$OUT/bench_resnet18_cifar_b128.json" 2>&1 |
  tee "$OUT/bench.log"

echo "== 2. training on $DEVICE =="
shapes_bn=recipes/shapes/shapes_small_cnn_sgdph.yaml
vit=(model.name=vit_tiny_patch16_224 model.kwargs.img_size=32 model.kwargs.patch_size=4)
gnb=(optimizer.estimator=gnb optimizer.gnb_fraction=0.25 optimizer.rule=normalized)
run() {  # name, recipe, overrides...
  local name=$1 recipe=$2
  shift 2
  echo "-- $name"
  timeout 120 "${sgdph[@]}" train "$recipe" trainer.device="$DEVICE" trainer.output_dir="$OUT/runs" trainer.name="$name" \
    trainer.progress=false "${train_args[@]}" "$@" 2>&1 | grep -E '^(epoch|error|Error)|Traceback|rror:' | tail -n 4
}
{
  run shapes-sgdm recipes/shapes/shapes_small_cnn_sgd.yaml
  run shapes-sgdph-gnb "$shapes_bn" "${gnb[@]}"
  run shapes-sgdph-gnb-bf16 "$shapes_bn" "${gnb[@]}" trainer.precision=bf16
  run shapes-sgdph-rowsum-autograd "$shapes_bn"
  run vit-sgdph-rowsum-autograd "$shapes_bn" "${vit[@]}"
  run vit-sgdph-gnb "$shapes_bn" "${vit[@]}" "${gnb[@]}"
} 2>&1 | tee "$OUT/train.log"
rm -rf "$OUT/runs"  # checkpoints do not come back (size); the log has what matters
