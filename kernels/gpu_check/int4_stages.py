"""Stages 6 to 9: int4 weights on the device, torch's tinygemm kernel on CUDA (the CPU kernel
in the dry run). The linear against its dequantized weights and against a dense bf16 linear,
the engine's decode steps with int4 weights against the dense model, and greedy identity with
speculation against without in the device's serving dtype, dense and int4."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kernels.gpu_check.engine_stages import (
    EngineHolder,
    build_runner,
    floor_row,
    greedy_tokens,
    random_load_model,
    step_plan,
    time_call,
    time_step,
    write_model_dir,
)
from kernels.gpu_check.plan import Plan
from kernels.gpu_check.stages import Deadline, StageResult, log

# The decoder's matrices of a Llama-3-8B layer and its LM head, as the runner fuses them
# ([out, in]); the dry run's are tiny.
LINEAR_SHAPES_8B = {
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}
LINEAR_SHAPES_TINY = {"qkv_proj": (128, 64), "down_proj": (64, 128)}
# The modules of the runner's CausalLM that take int4 weights (server/model/quantize.py's
# _FUSED_PARTS and the head).
INT4_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def int4_kernel(plan: Plan) -> str:
    from server.model.int4 import choose_kernel

    return choose_kernel("auto", plan.device)


# ---- 6. the linear -----------------------------------------------------------------------------


def exact_and_magnitude(qw: Any) -> tuple[Any, Any]:
    """float32 [N, K] each: the quantized weights, and the magnitudes A_vi behind the int4
    head's error bound (server/model/int4_head.py), on their device."""
    from server.model.int4_head import weight_magnitudes

    return qw.dequantize(), weight_magnitudes(qw)


def error_over_bound(layer: Any, exact_w: Any, magnitude: Any, x: Any) -> float:
    """The worst |kernel - exact| / (c sum_i |x_i| A_vi) over the outputs of rows x, where
    exact is the float32 product with the quantized weights and c the error factor the int4
    head's rescoring assumes for this kernel (int4_head.error_factor): at most 1 where the
    head's bound holds."""
    import torch

    from server.model.int4_head import error_factor

    got = layer._mm(x).float()
    exact = x.float() @ exact_w.t()
    bound = x.float().abs() @ magnitude.t()
    bound *= error_factor(layer.kernel, layer.in_features, layer.planes_in_kernel)
    return float(((got - exact).abs() / bound.clamp_min(torch.finfo(torch.float32).tiny)).max())


def rows_are_invariant(layer: Any, x: Any) -> bool:
    """Whether each row of an M-row product equals that row computed alone, bit for bit (what
    makes a verify row the decode row it stands for)."""
    import torch

    together = layer._mm(x)
    return all(torch.equal(together[i : i + 1], layer._mm(x[i : i + 1])) for i in range(len(x)))


def stage_int4_linear(plan: Plan, env: dict[str, Any]) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        import torch
        import torch.nn.functional as F

        from server.model.int4 import Int4Linear, quantize_rtn

        kernel = int4_kernel(plan)
        dtype = getattr(torch, plan.dtype)  # the serving dtype: bf16 on CUDA
        bw = (env.get("copy_tbps") or 1.0) * 1e12
        shapes = LINEAR_SHAPES_TINY if plan.dry_run else LINEAR_SHAPES_8B
        gen = torch.Generator(device=plan.device).manual_seed(0)
        result.data.update(kernel=kernel, dtype=str(dtype), hbm_tbps=bw / 1e12, rows=[])
        worst = 0.0
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=plan.device, generator=gen) * 0.02
            qw = quantize_rtn(w)
            layer = Int4Linear(qw, kernel=kernel)  # type: ignore[arg-type]
            exact_w, magnitude = exact_and_magnitude(qw)
            dense = w.to(dtype)
            int4_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
            for rows in (1, 8, 32, 64, 512):
                if deadline.expired:
                    result.status, result.reason = "partial", "budget spent before every shape"
                    return
                x = torch.randn(rows, k, device=plan.device, generator=gen).to(dtype)
                checked = rows <= 64  # prefill-sized rows are timed only
                err = error_over_bound(layer, exact_w, magnitude, x) if checked else None
                worst = max(worst, err or 0.0)
                int4_s = time_call(partial(layer._mm, x), plan.device, calls=20)
                dense_s = time_call(partial(F.linear, x, dense), plan.device, calls=20)
                result.data["rows"].append(
                    {
                        "matrix": name,
                        "out_x_in": f"{n}x{k}",
                        "rows": rows,
                        "int4_us": round(int4_s * 1e6, 2),
                        "dense_us": round(dense_s * 1e6, 2),
                        "dense_over_int4": round(dense_s / int4_s, 2),
                        "int4_floor_us": round(int4_bytes / bw * 1e6, 2),
                        "err_over_bound": "" if err is None else round(err, 4),
                        "row_invariant": rows_are_invariant(layer, x) if checked else "",
                    }
                )
                log(f"  int4 linear {result.data['rows'][-1]}")
            del w, qw, layer, dense, exact_w, magnitude
        result.data["worst_err_over_bound"] = round(worst, 4)
        if worst > 1.0:
            result.status = "fail"
            result.reason = (
                f"an output's error reached {worst:.2f}x the bound the int4 head's rescoring "
                f"assumes for {kernel} (server/model/int4_head.py error_factor)"
            )
        else:
            result.status = "pass"

    return body


# ---- 7. the engine with int4 weights ---------------------------------------------------------


def random_int4_load_model(*args: Any, **options: Any) -> tuple[Any, Any, Any]:
    """random_load_model, then every decoder linear and the head rounded to int4 (per group
    of 32, round to nearest) on the device, layer by layer, and installed as the loader
    installs a checkpoint's int4 weights."""
    from server.model import quantize
    from server.model.int4 import choose_kernel, quantize_rtn

    model, hf_config, tokenizer = random_load_model(*args, **options)
    kernel = choose_kernel("auto", next(model.parameters()).device.type)
    names = [
        name
        for name, _ in model.named_modules()
        if name.rpartition(".")[2] in INT4_MODULES or name == "lm_head"
    ]
    for name in names:
        weight = model.get_submodule(name).weight
        quantize.install_int4(model, {name: quantize_rtn(weight.float())}, kernel)
        del weight
    return model, hf_config, tokenizer


def stage_int4_engine(
    plan: Plan, env: dict[str, Any], holder: EngineHolder
) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        dense = holder.get()
        bw = (env.get("copy_tbps") or 1.0) * 1e12
        with tempfile.TemporaryDirectory(prefix="gpu-check-int4-") as tmp:
            t0 = time.monotonic()
            model_dir = write_model_dir(Path(tmp), plan.model)
            runner = build_runner(plan, model_dir, random_int4_load_model)
            result.data.update(kernel=int4_kernel(plan), build_s=round(time.monotonic() - t0, 1))
        result.data.update(hbm_tbps=bw / 1e12, rows=[])
        # Dense and int4 take turns per batch (one run, side by side).
        for batch in plan.decode_batches:
            if deadline.expired:
                result.status, result.reason = "partial", "budget spent before every batch"
                return
            row: dict[str, Any] = {"batch": batch}
            for label, r in (("dense", dense), ("int4", runner)):
                step = step_plan(r, batch, plan.context, 0, False, seed=batch)
                seconds = time_step(r, step, plan.repeats, plan.device)
                floor = floor_row(r, batch, plan.context, 1, seconds, bw)
                row.update(
                    {f"{label}_ms": floor["step_ms"], f"{label}_floor_ms": floor["floor_ms"]}
                )
            row["dense_over_int4"] = round(row["dense_ms"] / row["int4_ms"], 2)
            result.data["rows"].append(row)
            log(f"  int4 engine {row}")
        del runner
        result.status = "pass"

    return body


# ---- 8/9. greedy identity in the device's own precision ----------------------------------------


def stage_speculation_identity(
    plan: Plan, quantization: str
) -> Callable[[StageResult, Deadline], None]:
    """The tiny model in the device's serving dtype (bfloat16 on CUDA: ``greedy-identity``
    runs float32), dense (``bf16-greedy``) or int4 (``int4-greedy``: the real loader and its
    int4 cache): greedy tokens with tree speculation against the same engine without it, both
    with Triton attention."""

    def body(result: StageResult, deadline: Deadline) -> None:
        from server.config import SpeculativeConfig
        from tests.tiny_models import make_tiny_model

        tree = SpeculativeConfig(
            policy="fixed", method="tree", num_speculative_tokens=6, max_tree_width=3
        )
        dtype = plan.dtype  # the serving dtype: bf16 on CUDA, float32 in the dry run
        with tempfile.TemporaryDirectory(prefix="gpu-check-tiny-") as tmp:
            model_dir = make_tiny_model("llama", Path(tmp) / "llama")
            # An int4 copy of the model goes to a cache of this run's own.
            saved = os.environ.get("SPECD_CACHE_DIR")
            os.environ["SPECD_CACHE_DIR"] = str(Path(tmp) / "cache")
            # On CUDA int4 is served only with its kernel named (server/model/quantize.py).
            kernel_name = int4_kernel(plan)
            try:
                plain, _, _ = greedy_tokens(
                    plan, model_dir, "triton", SpeculativeConfig(), dtype, quantization, kernel_name
                )
                got, drafted, accepted = greedy_tokens(
                    plan, model_dir, "triton", tree, dtype, quantization, kernel_name
                )
            finally:
                if saved is None:
                    os.environ.pop("SPECD_CACHE_DIR", None)
                else:
                    os.environ["SPECD_CACHE_DIR"] = saved
        kernel = f" ({kernel_name})" if quantization == "int4" else ""
        same = sum(a == b for a, b in zip(got, plain, strict=True))
        result.data = {
            "model": f"tests/tiny_models.py llama, {quantization}{kernel}, {dtype}",
            "prompts": len(plain),
            "tokens_each": plan.greedy_tokens,
            "drafted": drafted,
            "accepted": accepted,
            "identical_prompts": same,
            "identical": got == plain,
        }
        if got != plain:
            i = next(i for i, (a, b) in enumerate(zip(got, plain, strict=True)) if a != b)
            at = next(j for j, (a, b) in enumerate(zip(got[i], plain[i], strict=False)) if a != b)
            result.data["first_divergence"] = {"prompt": i, "token": at}
            result.status = "fail"
            result.reason = (
                f"{len(plain) - same} of {len(plain)} prompts differ; prompt {i} from token "
                f"{at}: with tree speculation {got[i][at:]} != without {plain[i][at:]}"
            )
        elif drafted == 0:
            result.status = "fail"
            result.reason = "the tree drafter proposed nothing: speculation was not exercised"
        else:
            result.status = "pass"

    return body
