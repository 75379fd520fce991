"""The install path: which torch build `make` installs, and which Mitsuba variant runs.

``scripts/torch_build.sh`` decides between the CPU and a CUDA build of torch; the checks
use a stand-in ``nvidia-smi`` (``NVIDIA_SMI``), so they run on machines without a GPU.
``make -n`` shows the exact pip command each decision leads to, without installing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from core import REPO_ROOT
from core.raytracing.sionna_rt import CUDA_VARIANT, LLVM_VARIANT, choose_variant, drjit_backends

SCRIPT = REPO_ROOT / "scripts" / "torch_build.sh"
PIN = re.search(r"^torch==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)


@pytest.fixture
def gpu(tmp_path):
    """A stand-in nvidia-smi that lists one GPU, as on a CUDA machine."""
    (tmp_path / "gpu").mkdir()
    path = tmp_path / "gpu" / "nvidia-smi"
    path.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e)'\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def no_driver(tmp_path):
    """nvidia-smi installed, but no driver answers (exit 9, as the real one does)."""
    (tmp_path / "no_driver").mkdir()
    path = tmp_path / "no_driver" / "nvidia-smi"
    path.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\"\n"
                    "exit 9\n")
    path.chmod(0o755)
    return str(path)


def _script(*args: str, smi: str = "/nonexistent/nvidia-smi", build: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_BUILD"}
    env["NVIDIA_SMI"] = smi
    if build is not None:
        env["TORCH_BUILD"] = build
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_auto_detects_a_gpu_through_nvidia_smi(gpu, no_driver):
    assert _script("build", smi=gpu).stdout.strip() == "cuda"
    assert _script("build", smi=no_driver).stdout.strip() == "cpu"
    assert _script("build").stdout.strip() == "cpu"  # no nvidia-smi at all
    assert _script("build", smi=gpu, build="cpu").stdout.strip() == "cpu"  # asked for: wins over detection


def test_pip_arguments_of_each_build(gpu):
    assert _script("pip-args").stdout.strip() == ""  # CPU: requirements.txt's pin alone, as always
    assert _script("pip-args", smi=gpu).stdout.strip() == f"torch==={PIN}"  # exactly PyPI's build, never +cpu
    assert _script("pip-args", build="cuda").stdout.strip() == f"torch==={PIN}"
    assert _script("pip-args", build="cu128").stdout.split() == [
        "--extra-index-url", "https://download.pytorch.org/whl/cu128", f"torch=={PIN}+cu128"]


def test_an_unknown_build_is_refused():
    out = _script("pip-args", build="rocm")
    assert out.returncode == 2 and "TORCH_BUILD=rocm" in out.stderr and out.stdout == ""


def _make_install(tmp_path, **env_vars) -> list[str]:
    # run from `make test` too: a sub-make would otherwise print "Entering/Leaving directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_BUILD", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(env_vars)
    out = subprocess.run(["make", "--no-print-directory", "-n", "install", f"VENV={tmp_path / 'venv'}"],
                         cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_make_installs_the_cpu_build_as_before_and_cuda_when_a_gpu_is_there(tmp_path, gpu):
    venv = tmp_path / "venv"
    cpu = _make_install(tmp_path, NVIDIA_SMI="/nonexistent/nvidia-smi")
    assert f"{venv}/bin/python -m pip install -q -r requirements.txt" in [line.strip() for line in cpu]
    assert cpu[-1] == f"touch {venv}/.installed"
    cuda = _make_install(tmp_path, NVIDIA_SMI=gpu)
    assert f"{venv}/bin/python -m pip install -q -r requirements.txt torch==={PIN}" in cuda
    assert f"TORCH_BUILD=cuda bash scripts/torch_build.sh check {venv}/bin/python" in cuda
    assert cuda[-1] == f"touch {venv}/.installed-torch-cuda"  # its own stamp: a CPU venv gets reinstalled
    forced = _make_install(tmp_path, NVIDIA_SMI=gpu, TORCH_BUILD="cpu")
    assert forced[-1] == f"touch {venv}/.installed"


def test_check_refuses_a_cpu_torch_where_cuda_was_asked_for():
    import torch

    out = _script("check", sys.executable, build="cuda")
    if torch.version.cuda is None:
        assert out.returncode != 0 and "is a CPU build" in out.stderr
    else:
        assert out.returncode == 0 and f"CUDA {torch.version.cuda} build" in out.stdout
    assert _script("check", sys.executable, build="cpu").returncode == 0


# -- Mitsuba's variant ----------------------------------------------------------------------
BOTH = [CUDA_VARIANT, LLVM_VARIANT, "scalar_rgb"]


@pytest.mark.parametrize("available,has_cuda,has_llvm,expected", [
    (BOTH, True, True, CUDA_VARIANT),
    (BOTH, True, False, CUDA_VARIANT),
    (BOTH, False, True, LLVM_VARIANT),
    ([LLVM_VARIANT], True, True, LLVM_VARIANT),  # a GPU, but Mitsuba was built without the CUDA variant
])
def test_choose_variant(available, has_cuda, has_llvm, expected):
    assert choose_variant(available, has_cuda, has_llvm) == expected


@pytest.mark.parametrize("available,has_cuda,has_llvm", [
    (BOTH, False, False),  # no backend: libllvm missing, no GPU
    ([CUDA_VARIANT], False, True),  # the LLVM backend, but no LLVM variant built
    (["scalar_rgb"], True, True),
])
def test_choose_variant_explains_what_is_missing(available, has_cuda, has_llvm):
    with pytest.raises(RuntimeError, match=r"no usable Mitsuba variant.*libllvm19"):
        choose_variant(available, has_cuda, has_llvm)


def test_this_machine_gets_the_variant_of_its_backend():
    import mitsuba as mi

    has_cuda, has_llvm = drjit_backends()
    assert choose_variant(list(mi.variants()), has_cuda, has_llvm) == (CUDA_VARIANT if has_cuda else LLVM_VARIANT)
