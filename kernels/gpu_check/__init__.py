"""Everything a lent GPU should check, in one run: `python -m kernels.gpu_check [--dry-run]`.

Made for a bare CUDA machine with no network and no model files (torch, triton, transformers,
safetensors, tokenizers; pytest optional), in under 8 minutes. Stages, each with a time budget,
each recorded as pass / fail / skip / partial with its numbers or traceback; a stage that fails
does not stop the next one:

1. ``kernel-tests`` (correctness): pytest on tests/kernels and the Triton attention-backend
   tests, in a subprocess, without TRITON_INTERPRET.
2. ``kernel-bench`` (performance): ``python -m kernels.bench`` (8B attention shapes against the
   HBM floor and SDPA); its rows are read from its output, even when it runs out of time.
3. ``engine-decode`` (performance): the project's ModelRunner in bf16 on a Llama-3-8B-shaped
   model whose random weights are made on the device (no checkpoint: the loader is swapped for
   an in-memory one); decode step time at batch 1/8/32/64 against the bytes-read floor.
4. ``engine-verify`` (performance): steps verifying k = 1..64 draft rows per request (a chain
   and a random tree) at batch 1 and 8, against plain decode.
5. ``int4-linear`` (correctness): int4 linears with torch's tinygemm kernel at the 8B
   model's shapes and 1..512 rows: error against the product with the quantized weights,
   within the bound the int4 head's rescoring assumes (server/model/int4_head.py), rows
   computed alike whatever their count, time against a dense bf16 linear.
6. ``int4-engine`` (performance): the same 8B-shaped runner with its linears and head rounded
   to int4 on the device, decode steps at batch 1/8/32/64 beside the dense runner's.
7. ``greedy-identity`` (correctness): a tiny random model (tests/tiny_models.py) generates the
   same greedy tokens with Triton attention + tree speculation as with torch attention alone.
8. ``int4-greedy`` (correctness): the tiny model served int4 (``--quantization int4``: the real
   loader and its int4 cache) gives the same greedy tokens with tree speculation as without.

Writes one markdown file and a JSON beside it: by default ``$OUT/<date>-<device>.md`` when $OUT
is set (the device tool brings back only what is under $OUT), else
``loadtest/results/gpu/<date>-<device>.md``. ``--only STAGE ...`` runs those stages
after the environment. ``--dry-run`` runs the same code on CPU with tiny
shapes (the kernel-test stage only checks its paths: CI runs tests/kernels itself) and writes
to a temp dir unless ``--out`` is given; tests/test_gpu_check.py runs it, so these paths cannot
rot.

Exit status: 0 when no stage failed, 1 when any did (correctness or a crash), 2 when CUDA is
missing without --dry-run.

Modules, one job each; each imports only those listed above it, and none imports torch or
triton at import time (``__main__`` settles TRITON_INTERPRET first):

- ``plan``: Plan, make_plan, the model shapes and REPO.
- ``stages``: StageResult, Deadline, hard_limit, run_stage, log.
- ``environment``: device, versions, copy bandwidth (the ``environment`` stage).
- ``kernel_stages``: ``kernel-tests`` and ``kernel-bench`` and the parsing of their output.
- ``engine_stages``: the random-weight 8B-shaped runner, ``engine-decode``, ``engine-verify``,
  ``greedy-identity``.
- ``int4_stages``: ``int4-linear``, ``int4-engine``, ``int4-greedy``.
- ``report``: the markdown and JSON files and where they go.
- ``__main__``: the CLI; runs the stages in order.
"""
