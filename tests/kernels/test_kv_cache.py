"""write_kv / compact_kv / copy_blocks against their torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import (
    _as_layers,
    compact_kv,
    compact_kv_ref,
    copy_blocks,
    copy_blocks_ref,
    write_kv,
    write_kv_ref,
)

NB, BS, HKV, D = 10, 4, 2, 80  # D = 80: non-power-of-two, masked


def _cache(dtype: torch.dtype, device: str, layers: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (NB, BS, HKV, D) if layers is None else (layers, NB, BS, HKV, D)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_strided_fused_qkv_and_padding(dtype: torch.dtype, device: str) -> None:
    t, hq = 7, 4
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(t, (hq + 2 * HKV) * D, generator=gen).to(dtype).to(device)
    # non-contiguous views of the fused projection output, as the model produces them
    k = qkv[:, hq * D : (hq + HKV) * D].view(t, HKV, D)
    v = qkv[:, (hq + HKV) * D :].view(t, HKV, D)
    assert not k.is_contiguous()
    # shuffled slots across blocks, two padding rows (-1)
    slots = torch.tensor([37, -1, 2, 19, 5, -1, 39], dtype=torch.int64, device=device)
    kc, vc = _cache(dtype, device), _cache(dtype, device, seed=1)
    kr, vr = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, slots)
    write_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)  # pure copies: bit exact


def test_write_kv_rejects_bad_inputs(device: str) -> None:
    k = torch.zeros(3, HKV, D, device=device)
    kc = _cache(torch.float32, device)
    with pytest.raises(ValueError, match="int64"):
        write_kv(k, k, kc, kc, torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="dtypes differ"):
        write_kv(k.half(), k.half(), kc, kc, torch.zeros(3, dtype=torch.int64, device=device))


def _paths(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two requests whose trees sit right after their prefixes (node i at prefix + i) and whose
    accepted paths overlap their destinations and cross block boundaries (BS = 4)."""
    reqs = [
        # (first slot of the tree = prefix slot, accepted node indices along the path)
        (6, [0, 2, 3, 5, 9]),  # dst 6..10 from 6, 8, 9, 11, 15: reads slot 8 after dst 8..
        (21, [0, 1, 4, 7]),  # dst 21..24 from 21, 22, 25, 28
        (30, [0]),  # only the root: no move
    ]
    src, dst, cu = [], [], [0]
    for first, nodes in reqs:
        src += [first + n for n in nodes]
        dst += [first + k for k in range(len(nodes))]
        cu.append(len(src))
    return (
        torch.tensor(src, dtype=torch.int64, device=device),
        torch.tensor(dst, dtype=torch.int64, device=device),
        torch.tensor(cu, dtype=torch.int32, device=device),
    )


def _snapshot_compact(c: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Independent expectation: read every source first, then write (what an in-order copy
    must equal when source index >= destination index along each path)."""
    c = c.clone()
    flat = c.view(*c.shape[:-4], -1, HKV, D)  # slots on one axis
    vals = flat[..., src, :, :].clone()
    flat[..., dst, :, :] = vals
    return c


@pytest.mark.parametrize("layout", ["stacked", "views_of_one_storage", "separate"])
def test_compact_kv_overlapping_paths(layout: str, device: str) -> None:
    src, dst, cu = _paths(device)
    layers = 3
    if layout == "stacked":
        caches = _cache(torch.float16, device, layers=layers)
        expected = [_snapshot_compact(caches, src, dst)]
        ref = caches.clone()
        compact_kv(caches, src, dst, cu)
        compact_kv_ref(ref, src, dst, cu)
        got = [caches]
    else:
        if layout == "views_of_one_storage":  # kv[l, 0] / kv[l, 1] of one allocation
            kv = _cache(torch.float16, device, layers=2 * layers).view(layers, 2, NB, BS, HKV, D)
            caches = [kv[layer, i] for layer in range(layers) for i in range(2)]
            assert len(_as_layers(caches)) == 1  # one launch for all layers
        else:
            caches = [_cache(torch.float16, device, seed=s) for s in range(2 * layers)]
        expected = [_snapshot_compact(c, src, dst) for c in caches]
        ref = [c.clone() for c in caches]
        compact_kv(caches, src, dst, cu)
        compact_kv_ref(ref, src, dst, cu)
        got = caches
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    for g, r in zip(got, ref if isinstance(ref, list) else [ref], strict=True):
        assert torch.equal(g, r)


def test_compact_kv_differs_from_reverse_order(device: str) -> None:
    # the order matters: copying the same path back to front gives a different cache
    src, dst, cu = _paths(device)
    c = _cache(torch.float32, device)
    fwd = c.clone()
    compact_kv(fwd, src, dst, cu)
    rev = c.clone()
    compact_kv_ref(rev, src[:5].flip(0), dst[:5].flip(0), cu[:2])
    assert not torch.equal(fwd, rev)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_copy_blocks(id_dtype: torch.dtype, device: str) -> None:
    src = torch.tensor([3, 0, 7], dtype=id_dtype, device=device)
    dst = torch.tensor([5, 9, 1], dtype=id_dtype, device=device)
    stacked = _cache(torch.bfloat16, device, layers=2)
    ref = stacked.clone()
    copy_blocks(stacked, src, dst)
    copy_blocks_ref(ref, src, dst)
    assert torch.equal(stacked, ref)
    assert torch.equal(stacked[:, 5], stacked[:, 3])
    separate = [_cache(torch.float16, device, seed=s) for s in range(3)]
    ref_list = [c.clone() for c in separate]
    copy_blocks(separate, src, dst)
    copy_blocks_ref(ref_list, src, dst)
    for a, b in zip(separate, ref_list, strict=True):
        assert torch.equal(a, b)
