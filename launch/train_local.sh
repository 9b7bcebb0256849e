#!/usr/bin/env bash
# One-machine pre-training: torchrun with N processes on GPUs, or on CPU (DeepSpeed's CPU
# accelerator, gloo) when there is no GPU.
#
#   launch/train_local.sh CONFIG [key=value overrides...]
#   NPROC=2 launch/train_local.sh configs/demo_ml1m.yaml train.max_steps=20
#   DRY_RUN=1 launch/train_local.sh configs/food_kitchen_stable.yaml    # print the command only
#
# Environment:
#   NPROC         processes (default: one per GPU; 2 on CPU)
#   CPREC_DEVICE  auto (default: GPU when nvidia-smi lists one) | gpu | cpu
#   DRY_RUN=1     print the resolved command instead of running it
#   PYTHON        the interpreter that validates the config first (default: python)
# A rerun of the same command resumes from <train.output_dir>/checkpoints/latest.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need_config "${BASH_SOURCE[0]}" "$@"
config=$1
shift

device=${CPREC_DEVICE:-auto}
gpus=0
if [[ $device != cpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
case $device in
  auto) if [[ $gpus -gt 0 ]]; then device=gpu; else device=cpu; fi ;;
  gpu) [[ $gpus -gt 0 ]] || die "CPREC_DEVICE=gpu but nvidia-smi lists no GPU" ;;
  cpu) ;;
  *) die "CPREC_DEVICE must be auto, gpu or cpu, got '$device'" ;;
esac

cmd=()
if [[ $device == cpu ]]; then
  # DeepSpeed picks its accelerator at import time; without this it looks for CUDA and fails.
  cmd=(env DS_ACCELERATOR=cpu)
  nproc=${NPROC:-2}
else
  nproc=${NPROC:-$gpus}
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$nproc'"

# Validate the config once here: under torchrun a bad key would be reported by every rank and
# followed by torchrun's own traceback.
if [[ ${DRY_RUN:-0} != 1 ]]; then
  "${PYTHON:-python}" -m cprec.cli train --check "$config" "$@" || exit $?
fi

# --standalone: a local rendezvous on a free port, so two runs on one machine do not collide.
cmd+=(torchrun --standalone --nnodes=1 "--nproc_per_node=$nproc" -m cprec.cli train "$config" "$@")
run_cmd "${cmd[@]}"
