# Sourced by the GPU scripts (gpu_session.sh, gpu_compiled.sh): their shared set-up. OUT, DEVICE, QUICK
# from the environment (defaults: gpu-out/, cuda, 0); the checkout on PYTHONPATH (nothing installed: the
# machine's own torch and timm); `"${sgdph[@]}"` runs the CLI; the machine's description goes to
# $OUT/machine.txt.
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
sgdph=(python3 -m sgdph_tools)

{
  python3 -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '|',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>/dev/null
} 2>&1 | tee "$OUT/machine.txt"
