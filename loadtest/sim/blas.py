"""One BLAS thread for the simulator's process.

The policies' cost-model refits are least squares on a few hundred x 29 matrices; on a small
shared machine a multi-threaded OpenBLAS made each ~25x slower (thread wake-ups and
contention), which dominated a simulation. The CLI sets OPENBLAS_NUM_THREADS before numpy
loads; where numpy is already loaded (a test session), this asks the loaded OpenBLAS itself.
Best effort: nothing happens where the library or its symbol is not found.
"""

from __future__ import annotations

import ctypes
import re

_SYMBOLS = (
    "scipy_openblas_set_num_threads64_",  # numpy's bundled OpenBLAS (64-bit ints)
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def single_thread_blas() -> bool:
    """True if a loaded OpenBLAS was set to one thread."""
    import numpy  # noqa: F401  (loads the library this looks for)

    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return False
    done = False
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)
                done = True
                break
    return done
