#!/usr/bin/env bash
# Which build of torch `make install` (so `make run` and `make test`) puts in the venv.
#
#   TORCH_BUILD=auto   (default) cuda when `nvidia-smi -L` lists a GPU, else cpu
#   TORCH_BUILD=cpu    requirements.txt's pin alone (torch==X.Y.Z). Where pip's find-links
#                      hold the CPU wheel (X.Y.Z+cpu, as on the project's machines) that is
#                      the one installed: nothing changes for CPU machines
#   TORCH_BUILD=cuda   PyPI's own build of the same version (torch===X.Y.Z: the exact version,
#                      never a +cpu local build). On Linux x86_64 that is the CUDA build; its
#                      CUDA runtime comes as NVIDIA's wheels from PyPI (for torch 2.13: CUDA 13,
#                      which needs an NVIDIA driver >= 580)
#   TORCH_BUILD=cuXYZ  PyTorch's wheel index for CUDA X.Y, e.g. cu128 for an older driver
#                      (torch==X.Y.Z+cu128 from https://download.pytorch.org/whl/cu128)
#
# Usage: torch_build.sh build           the build to install: cpu, cuda or cuXYZ
#        torch_build.sh pip-args        extra arguments for `pip install -r requirements.txt`
#        torch_build.sh check PYTHON    after the install: fail if a CUDA build was asked for
#                                       and PYTHON's torch is not one
# NVIDIA_SMI overrides the nvidia-smi command (tests use a stand-in).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
requirement="$(grep -E '^torch==' "$here/../requirements.txt" | head -n 1 | sed 's/[[:space:]]*#.*//')"
version="${requirement#torch==}"
[ -n "$version" ] || { echo "torch_build.sh: no torch==VERSION pin in requirements.txt" >&2; exit 2; }

build() {
  local wanted="${TORCH_BUILD:-auto}"
  case "$wanted" in
    auto)
      if "${NVIDIA_SMI:-nvidia-smi}" -L 2>/dev/null | grep -q '^GPU '; then echo cuda; else echo cpu; fi ;;
    cpu | cuda) echo "$wanted" ;;
    cu[0-9][0-9]*) echo "$wanted" ;;
    *) echo "torch_build.sh: TORCH_BUILD=$wanted: use auto, cpu, cuda or cuXYZ (e.g. cu128)" >&2; exit 2 ;;
  esac
}

case "${1:-build}" in
  build) build ;;
  pip-args)
    b="$(build)"
    case "$b" in
      cpu) ;;
      cuda) echo "torch===$version" ;;
      *) echo "--extra-index-url https://download.pytorch.org/whl/$b torch==$version+$b" ;;
    esac ;;
  check)
    b="$(build)"
    [ "$b" = cpu ] && exit 0
    "${2:?usage: torch_build.sh check PYTHON}" - <<'EOF'
import torch
if torch.version.cuda is None:
    raise SystemExit(f"torch {torch.__version__} is a CPU build, though a CUDA build was asked for (TORCH_BUILD)")
state = "sees " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "sees no GPU (driver too old?)"
print(f"torch {torch.__version__}: CUDA {torch.version.cuda} build, {state}")
EOF
    ;;
  *) echo "usage: torch_build.sh build | pip-args | check PYTHON" >&2; exit 2 ;;
esac
