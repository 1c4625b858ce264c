#!/usr/bin/env bash
# Check usp_npu on a real Ascend node: torchrun over the local NPUs, every CP algorithm against
# single-device torch_npu.npu_fusion_attention (bf16, tolerance 2.5e-2). Prints one line per
# configuration and one summary line; exits non-zero if any configuration failed.
#
#   tests/npu/run_on_device.sh                  # all visible NPUs
#   NPROC=4 tests/npu/run_on_device.sh --seq 8192
#   tests/npu/run_on_device.sh --emulate        # no NPU: CPU ranks, emulated torch_npu (NPROC=2)
#
# Environment: NPROC (processes, default: visible NPUs), PYTHON (default: python),
# ASCEND_SET_ENV (CANN set_env.sh, default: /usr/local/Ascend/ascend-toolkit/set_env.sh).
# Arguments are passed to check_on_device.py (--help lists them).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python}"

emulate=0
for arg in "$@"; do
  [[ "$arg" == "--emulate" ]] && emulate=1
done

# The CANN environment, unless it is already loaded (set_env.sh exports ASCEND_TOOLKIT_HOME).
set_env="${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
if [[ $emulate -eq 0 && -z "${ASCEND_TOOLKIT_HOME:-}" && -f "$set_env" ]]; then
  set +eu # set_env.sh is not written for -e/-u
  # shellcheck disable=SC1090
  source "$set_env"
  set -eu
fi

# Use the checkout when usp_npu is not installed.
if ! "$python" -c "import usp_npu" >/dev/null 2>&1; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ -z "${NPROC:-}" ]]; then
  if [[ $emulate -eq 1 ]]; then
    NPROC=2
  else
    NPROC="$("$python" -c 'import torch, torch_npu; print(torch.npu.device_count())')" || {
      echo "run_on_device.sh: cannot count NPUs (is torch_npu installed and CANN loaded?)" >&2
      exit 2
    }
  fi
fi
if [[ "$NPROC" -lt 1 ]]; then
  echo "run_on_device.sh: no NPU visible (NPROC=$NPROC)" >&2
  exit 2
fi

# torchrun, from the same interpreter that imports torch_npu
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  "$here/check_on_device.py" "$@"
