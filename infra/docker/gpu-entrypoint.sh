#!/bin/sh
# inferlab-gpu-entrypoint: the GPU image refuses to start without a GPU, and says how to get one.
#
# Without this check the labs would start and silently run on CPU, and GPU thresholds would be
# graded against a CPU. Then it hands over to inferlab-entrypoint (the common checks).
set -eu

fix="run with \`docker compose --profile gpu up lab-gpu\` on a host with the NVIDIA Container Toolkit, or use the \`lab\` service for CPU"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  printf 'inferlab: no NVIDIA GPU is visible in this container (nvidia-smi is missing: the NVIDIA Container Toolkit did not inject the driver): %s\n' "$fix" >&2
  exit 69
fi
if ! smi=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1); then
  printf 'inferlab: no NVIDIA GPU is visible in this container (nvidia-smi: %s): %s\n' "$smi" "$fix" >&2
  exit 69
fi
if ! err=$(python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch.cuda.is_available() is False (torch %s, CUDA %s)' % (torch.__version__, torch.version.cuda))" 2>&1); then
  printf 'inferlab: no NVIDIA GPU is visible in this container (%s; nvidia-smi sees: %s; CUDA 13 needs driver 580 or newer): %s\n' "$err" "$smi" "$fix" >&2
  exit 69
fi

exec inferlab-entrypoint "$@"
