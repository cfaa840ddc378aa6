"""Fused CPU kernels in C++ (`cpu_kernels.cpp`), compiled on first use; PyTorch ops wherever they cannot run.

On a CPU, the element-wise parts of an MoE model cost about as much as they move through memory, and PyTorch's eager
ops move a tensor once per op: SwiGLU's backward through autograd is ~8 passes over [M, 2F], RMSNorm's ~10. The
kernels here do each in one pass (forward) or one pass per output (backward):

- `swiglu_forward / swiglu_backward`: silu(gate) * up (* a per-row scale: the combine weight), the gradient of both
  halves written into one buffer, and the scale's gradient;
- `rms_norm_forward / rms_norm_backward`: y = x * rstd * w and its gradients;
- `rope`, `cross_entropy_forward`: the language model's rotary embedding, and its loss with the loss's gradient
  written in the same pass;
- `experts_swiglu_forward / experts_swiglu_backward`: plain SwiGLU experts over expert-sorted rows, one expert at a
  time (GEMM -> SwiGLU -> GEMM, and the backward's five GEMMs and SwiGLU backward back to back, torch's own GEMMs),
  optionally gathering each expert's rows from the token tensor on the fly: the intermediates stay in cache and
  the [M, D] gathered input is never made;
  bfloat16 expert weights are converted to float32 one expert at a time on CPUs where bfloat16 GEMMs are emulated
  (`bf16_matmul_emulated`);
- `moe_decode`: a few token-slots without autograd (decoding): each touched expert's weights streamed once, in
  float32 or bfloat16;
- `causal_attention_forward / causal_attention_backward`: causal grouped-query attention over a short chunk,
  register-tiled multiply-adds that follow the causal triangle, the probabilities kept for the backward pass
  (layers/attention.py `causal_attention` decides which chunks take it).

They use `at::vec::Vectorized<float>` with the vector ISA torch itself dispatches to on this CPU (AVX2/AVX-512), so
exp() is torch's own routine. Float32 contiguous CPU tensors only (the decode kernel also bfloat16); callers
(layers/experts.py, layers/moe.py, layers/attention.py, models/lm.py) check `usable(...)` and otherwise run their
PyTorch form, and tests/layers/test_kernels.py checks one against the other.

Building needs a C++ compiler and ninja (a dependency of moekit); it takes ~30-60 s once per machine, torch version
and source version (cached under torch's extension directory, `TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions).
Where it fails, moekit warns once and uses the PyTorch forms. `MOEKIT_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_STALE_LOCK_SECONDS = 600

_ISA_FLAGS = {  # torch.backends.cpu.get_cpu_capability() -> compiler flags selecting at::vec's implementation
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}  # fmt: skip


def enabled() -> bool:
    """False where the environment says MOEKIT_KERNELS=0."""
    return os.environ.get("MOEKIT_KERNELS", "1") != "0"


def _flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags)."""
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends.cpu, "get_cpu_capability") else ""
    # -ffp-contract=off: no fused multiply-adds the source did not write, so products round as in torch's own ops.
    cflags = ["-O3", "-ffp-contract=off", *_ISA_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])]
    # at::parallel_for is inline OpenMP: without -fopenmp the kernels would run on one thread. Linking -fopenmp
    # names libgomp.so.1, the soname torch's own libtorch_cpu loads, so both share one OpenMP runtime and pool.
    openmp = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
    return cflags + (["-fopenmp"] if openmp else []), (["-fopenmp"] if openmp else [])


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary is not on it when a venv is not activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _extension() -> tuple[str, Path, bytes, list[str], list[str]]:
    """The extension's name (a digest of the source, the flags and torch's version), its build folder, the source
    and the compiler and linker flags."""
    from torch.utils import cpp_extension

    code, (cflags, ldflags) = _SOURCE.read_bytes(), _flags()
    digest = hashlib.sha256(code + " ".join(cflags + ldflags).encode() + torch.__version__.encode())
    name = f"moekit_cpu_kernels_{digest.hexdigest()[:12]}"
    return name, Path(cpp_extension._get_build_directory(name, verbose=False)), code, cflags, ldflags


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name, build_dir, code, cflags, ldflags = _extension()
    lock = build_dir / "lock"  # torch's build baton: a build killed mid-way leaves it, and every later load would
    try:  # wait on it forever; no build takes minutes, so an old one is stale
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            warnings.warn(f"removing a stale kernel build lock {lock} (a build killed mid-way)", RuntimeWarning,
                          stacklevel=3)
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    # Compile a copy inside the build folder: the name already pins the content, and a fixed path keeps ninja from
    # rebuilding whenever another checkout (another source path) of the same version loads it.
    source = build_dir / _SOURCE.name
    fresh = not source.exists() or source.read_bytes() != code
    if fresh:
        tmp = source.with_name(f".{source.name}.{os.getpid()}.tmp")
        tmp.write_bytes(code)
        os.replace(tmp, source)
    if fresh or not any(build_dir.glob(f"{name}*.so")):
        print("moekit: compiling its fused CPU kernels (once per machine, torch version and kernel source; ~30-60 s)"
              " ...", file=sys.stderr, flush=True)
    _ensure_ninja_on_path()

    def load() -> ModuleType:
        return cpp_extension.load(
            name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
            build_directory=str(build_dir), verbose=False,
        )

    try:
        return load()
    except ImportError as e:
        # A library that exists but does not load (a build killed while linking leaves a truncated file that ninja
        # then believes up to date): delete it and build once more, instead of falling back on every later run.
        libraries = list(build_dir.glob(f"{name}*.so"))
        if not libraries:
            raise
        warnings.warn(f"rebuilding moekit's CPU kernels: {libraries[0]} did not load ({e})", RuntimeWarning,
                      stacklevel=3)
        for library in libraries:
            library.unlink(missing_ok=True)
        return load()


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; None when disabled or when they cannot be built (a
    warning says why, once)."""
    global _module, _tried
    if _module is not None or _tried:
        return _module
    with _lock:
        if not _tried:
            if enabled():
                try:
                    _module = _build()
                except Exception as e:  # no compiler, no ninja, a build error: run the PyTorch forms instead
                    lines = str(e).strip().splitlines() or [""]
                    reason = next((line for line in lines if "error:" in line), lines[-1]).strip()  # compiler
                    warnings.warn(
                        f"moekit's fused CPU kernels could not be built ({type(e).__name__}: {reason[:300]}); using "
                        "PyTorch ops instead (slower). Set MOEKIT_KERNELS=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _tried = True
    return _module


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: float32 CPU (None entries ignored), and the kernels built."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return False
    return cpu_kernels() is not None


def bf16_matmul_emulated() -> bool:
    """Whether this CPU lacks bfloat16 matrix instructions (x86 without AVX512_BF16 or AMX-BF16), so that PyTorch's
    bfloat16 GEMMs are emulated at about a quarter of the float32 rate: there the fused experts compute bfloat16
    experts in float32 (bfloat16 storage, float32 arithmetic: the precision of a bfloat16 GEMM's float32
    accumulation, without rounding the hidden activations to bfloat16 between the two products)."""
    global _bf16_emulated
    if _bf16_emulated is None:
        try:
            caps = torch._C._cpu._get_cpu_capability()
        except Exception:  # an older or newer torch without this query: keep PyTorch's bfloat16 GEMMs
            caps = {}
        _bf16_emulated = (
            caps.get("architecture") in ("x86_64", "AMD64")
            and not caps.get("avx512_bf16", True)
            and not caps.get("amx_bf16", True)
        )
    return _bf16_emulated


_bf16_emulated: bool | None = None


def reset() -> None:
    """Forget the loaded module so the next call re-reads MOEKIT_KERNELS (for tests)."""
    global _module, _tried
    with _lock:
        _module, _tried = None, False
