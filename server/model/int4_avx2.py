"""specd's own CPU int4 kernel (kernels/cpu/int4_linear.cpp): float32, AVX2 + FMA, built at
first use.

torch's int4 CPU kernel computes in bfloat16. CPUs without AVX-512 BF16 (every AVX2-only
machine) emulate that, and on the 2-core AVX2 EPYC it spent ~29 ms of a ~48 ms SmolLM2-135M
decode step. This kernel expands the 4-bit values to float32 in registers (a per-lane shift,
no shuffles) and multiplies in float32: on that machine a forward's worth of the model's
decoder matrices took 23.1 ms against torch's 27.2 at one row, 25 against 52 at five and 1.2 s
against 1.6 at 256 (``python -m loadtest.bench_int4_kernels``,
loadtest/results/engine/int4-kernels.md). Being float32 it is also closer to the dequantized
weights than the bf16 kernel (no input or output rounding).

Every output is computed by the same operations whatever the row count, the block it falls in
or the thread count, so a verify row equals the decode row it stands for (the kernel's
comment says how). GGUF Q8_0 weights, which int4.split_q8 holds as two 4-bit planes, are
recombined exactly into int8 (``as_q8``) and computed one byte a value (``int8_linear``): the
same bytes as the planes, half the vector work.

The extension is compiled with torch.utils.cpp_extension on first use (~30 s, then cached
under torch's extensions directory) where the CPU has AVX2 and FMA and a C++ compiler and
ninja are present. Anywhere else ``load()`` returns None and int4 layers use torch's kernel.
``--int4-kernel`` (``auto``, ``avx2``, ``aten``) overrides the choice (int4.py).
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "cpu" / "int4_linear.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma"]
GROUP_SIZE = 32
# A build lock older than this was left by a compile that was killed (one takes 20-45 s here):
# torch's loader would wait on it forever.
STALE_LOCK_S = 600.0


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def unavailable_reason() -> str | None:
    """Why the kernel can't be built here, or None if it can be tried."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler on PATH"
    if not shutil.which("ninja"):
        return "no ninja on PATH"
    return None


# Threads each kernel call runs on (kernels/cpu/work_pool.h): 1 until the engine sets its
# --kernel-threads (server/model/cpu_threads.py). Workers spin this long for the next call
# (within a forward, calls come tens of microseconds apart) and then sleep.
_kernel_threads = 1
KERNEL_SPIN_US = 1000


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, or None (logged once) where it can't be had."""
    module = load_extension("specd_int4_avx2", SOURCE, "int4 kernel", "torch's")
    if module is not None:
        module.set_threads(_kernel_threads, KERNEL_SPIN_US)
    return module


def set_kernel_threads(threads: int) -> None:
    """Threads for every call of specd's CPU kernels from now on: the int4/int8 linears here
    and the paged attention and top-k kernels, which run on this extension's threads
    (attention_cpu, top_k_cpu)."""
    global _kernel_threads
    if threads < 1:
        raise ValueError(f"kernel threads must be >= 1, got {threads}")
    _kernel_threads = threads
    if load.cache_info().currsize:  # already loaded: apply now
        module = load()
        if module is not None:
            module.set_threads(threads, KERNEL_SPIN_US)


def kernel_threads() -> int:
    return _kernel_threads


def load_extension(name: str, source: Path, what: str, fallback: str) -> ModuleType | None:
    """One of specd's AVX2 C++ extensions (kernels/cpu/), compiled on first use and cached by
    torch; None (logged) where it can't be had, and the caller uses ``fallback``."""
    reason = unavailable_reason()
    if reason is not None:
        logger.info("specd's AVX2 %s is not used: %s", what, reason)
        return None
    from torch.utils.cpp_extension import load as build

    build_dir = _build_directory(name)
    if build_dir is not None:
        clear_stale_build_lock(build_dir)
    logger.info("loading specd's AVX2 %s (compiled on first use, ~30-45 s; then cached)", what)
    start = time.perf_counter()
    try:
        module = build(name=name, sources=[str(source)], extra_cflags=_FLAGS, verbose=False)
    except Exception as exc:  # a compiler error must not stop serving: the fallback remains
        logger.warning("specd's AVX2 %s failed to build (%s); using %s", what, exc, fallback)
        return None
    logger.info("AVX2 %s ready in %.1f s", what, time.perf_counter() - start)
    return module


def _build_directory(name: str) -> Path | None:
    """Where torch builds extension ``name`` (TORCH_EXTENSIONS_DIR or its default), or None
    if this torch no longer has the private helper that says so (then no lock is checked)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except (ImportError, TypeError, OSError):
        return None


def clear_stale_build_lock(build_dir: Path, now: float | None = None) -> bool:
    """Removes ``build_dir``'s lock when it is older than ``STALE_LOCK_S`` (True if it did).
    Why: torch holds a lock file while it compiles an extension and every other loader waits
    for it to go; a server stopped mid-compile (Ctrl-C on the first ``specd serve``) leaves
    it behind, and the next start then hangs at "loading specd's AVX2 ..." with no end. A
    younger lock may be another process's compile in progress: left, with a warning that
    says which file to remove if none is."""
    lock = build_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        logger.warning(
            "waiting for another process's build (lock %.0f s old; if no other specd is "
            "starting, a stopped compile left it: remove %s)",
            age,
            lock,
        )
        return False
    logger.warning(
        "removing a build lock left by an interrupted compile (%.0f s old): %s",
        age,
        lock,
    )
    lock.unlink(missing_ok=True)
    return True


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's layout of w = (q - 8) * scale + zero (q uint8 [N, K] in 0..15; scale and
    zero float32 [N, K / 32]): packed uint8 [N, K / 2], scales and offsets float32 [N, K / 32]
    with w = q * scale + offset.

    In each group of 32 the 16 bytes are 4 little-endian dwords; nibble t (bits 4t..4t+3) of
    dword d holds the value at position 8 (t // 2) + 4 (t % 2) + d of the group, which is where
    the kernel's shift of lane l of vector c (nibble 2c + l // 4 of dword l % 4) finds it.
    """
    n, k = q.shape
    # positions p = 8 c + 4 h + d -> [d, t = 2 c + h]
    nibbles = q.to(torch.uint8).reshape(n, k // GROUP_SIZE, 4, 2, 4).permute(0, 1, 4, 2, 3)
    nibbles = nibbles.reshape(n, k // GROUP_SIZE, 4, 8)
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).reshape(n, k // 2).contiguous()
    scale = scale.float().contiguous()
    offset = (zero.float() - 8 * scale).contiguous()
    return packed, scale, offset


def as_q8(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The int8 form (q8 int8 [N, K], scales, offsets float32 [N, K / 32]; w = q8 * scale +
    offset) of a two-plane weight that int4.split_q8 made from GGUF Q8_0 blocks (plane hi:
    scale 16 d, zero 0; plane lo: scale d, zero 8 d), or None for any other two planes (a
    fused Q4 + Q8_0 matrix's zero planes). Exact: q8 = 16 (hi - 8) + lo."""
    k = q.shape[1] // 2
    groups = k // GROUP_SIZE
    d = scale[:, groups:]
    if not (
        bool((zero[:, :groups] == 0).all())
        and torch.equal(scale[:, :groups], 16 * d)
        and torch.equal(zero[:, groups:], 8 * d)
    ):
        return None
    q8 = 16 * (q[:, :k].to(torch.int16) - 8) + q[:, k:].to(torch.int16)
    return q8.to(torch.int8).contiguous(), d.float().contiguous(), torch.zeros_like(d).float()


def linear(
    x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """float32 x [M, K] @ w.T -> float32 [M, N], for weights made by ``pack`` (uint8) or
    ``as_q8`` (int8)."""
    module = load()
    if module is None:
        raise RuntimeError(f"the AVX2 int4 kernel is not available: {unavailable_reason()}")
    if weights.dtype == torch.int8:
        return module.int8_linear(x.float(), weights, scales, offsets)
    return module.int4_linear(x.float(), weights, scales, offsets)
