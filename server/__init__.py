"""specd: an OpenAI-compatible serving daemon with goodput-optimal speculative decoding."""

import os

# libgomp's default busy-waits its worker threads. When the engine core, the API process and
# anything else share a few cores, that spinning starves the thread doing real work: measured
# on a 2-core machine, a [2, 576] x [576, 960] linear took 24 ms with 2 spinning threads under
# load and 0.14 ms with passive waiting. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
