"""Import ``sionna.rt`` once, with the Mitsuba variant this machine's Dr.Jit supports.

The variant follows Dr.Jit, not torch: a torch CPU wheel on a CUDA machine must still
ray-trace on the GPU, and a CUDA torch on a machine whose Dr.Jit has no CUDA backend
must not ask Mitsuba for a variant it cannot run.
"""

from __future__ import annotations

CUDA_VARIANT = "cuda_ad_mono_polarized"
LLVM_VARIANT = "llvm_ad_mono_polarized"

_rt = None


def choose_variant(available: list[str], has_cuda: bool, has_llvm: bool) -> str:
    """The Mitsuba variant to use, given Mitsuba's built variants and Dr.Jit's backends."""
    if has_cuda and CUDA_VARIANT in available:
        return CUDA_VARIANT
    if has_llvm and LLVM_VARIANT in available:
        return LLVM_VARIANT
    raise RuntimeError(
        f"no usable Mitsuba variant: Dr.Jit backends cuda={has_cuda} llvm={has_llvm}, "
        f"Mitsuba variants {available}; install libllvm19 for the CPU backend"
    )


def drjit_backends() -> tuple[bool, bool]:
    """``(has_cuda, has_llvm)`` as Dr.Jit reports them on this machine."""
    import drjit as dr

    return bool(dr.has_backend(dr.JitBackend.CUDA)), bool(dr.has_backend(dr.JitBackend.LLVM))


def import_sionna_rt():
    """Import ``sionna.rt`` once, after setting the variant from :func:`choose_variant`."""
    global _rt
    if _rt is not None:
        return _rt
    import mitsuba as mi

    if mi.variant() is None:
        mi.set_variant(choose_variant(list(mi.variants()), *drjit_backends()))
    import sionna.rt as rt

    _rt = rt
    return rt
