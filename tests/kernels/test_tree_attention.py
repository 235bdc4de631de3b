"""tree_attention against its torch reference and against plain causal SDPA.

Under TRITON_INTERPRET=1 shapes stay small (prefixes of tens of tokens): the interpreter costs
~0.1-1 s per launch here. On CUDA the same tests run compiled.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TOL, chain_parents, make_case, random_parents, star_parents

from kernels.tree_attention import tree_attention
from kernels.tree_attention_ref import tree_attention_ref


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs err {err} > {TOL[dtype]} for {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_mixed_batch(dtype: torch.dtype, device: str) -> None:
    # decode (1 node), chain, random tree, in one launch; non-aligned prefixes (bs = 8)
    gen = torch.Generator().manual_seed(1)
    trees = [[-1], chain_parents(5), random_parents(9, gen)]
    case = make_case(
        q_lens=[1, 5, 9], prefixes=[13, 0, 21], hq=8, hkv=2, dtype=dtype, trees=trees, device=device
    )
    _close(tree_attention(*case.args()), tree_attention_ref(*case.args()), dtype)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_ratios(group: int, device: str) -> None:
    gen = torch.Generator().manual_seed(group)
    trees = [random_parents(6, gen), [-1]]
    case = make_case(
        q_lens=[6, 1], prefixes=[10, 3], hq=2 * group, hkv=2, trees=trees, device=device, seed=group
    )
    _close(tree_attention(*case.args()), tree_attention_ref(*case.args()), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_dim_80_padded(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(80)
    case = make_case(
        q_lens=[7, 2],
        prefixes=[11, 5],
        hq=4,
        hkv=2,
        d=80,
        dtype=dtype,
        trees=[random_parents(7, gen), chain_parents(2)],
        device=device,
    )
    out = tree_attention(*case.args())
    assert out.shape == (9, 4, 80)
    _close(out, tree_attention_ref(*case.args()), dtype)


def test_zero_and_unaligned_prefixes_causal(device: str) -> None:
    # mask_words=None: prefill chunks (prefix 0 and a later chunk at an unaligned prefix)
    case = make_case(q_lens=[12, 5, 1], prefixes=[0, 19, 7], hq=4, hkv=1, bs=4, device=device)
    _close(tree_attention(*case.args()), tree_attention_ref(*case.args()), torch.float16)


def test_decode_one_node_tree_equals_no_mask(device: str) -> None:
    case = make_case(q_lens=[1, 1, 1], prefixes=[0, 9, 30], trees=[[-1]] * 3, device=device)
    with_mask = tree_attention(*case.args())
    case.mask_words = None
    without = tree_attention(*case.args())
    torch.testing.assert_close(with_mask, without, rtol=0, atol=0)
    _close(without, tree_attention_ref(*case.args()), torch.float16)


def test_tree_spanning_two_mask_words(device: str) -> None:
    gen = torch.Generator().manual_seed(40)
    trees = [random_parents(40, gen), random_parents(3, gen)]
    case = make_case(q_lens=[40, 3], prefixes=[9, 17], hq=4, hkv=2, trees=trees, device=device)
    assert case.mask_words is not None and case.mask_words.shape == (43, 2)
    _close(
        tree_attention(*case.args(), block_n=16), tree_attention_ref(*case.args()), torch.float16
    )


def test_chain_equals_causal_sdpa(device: str) -> None:
    """Property: a chain tree is causal attention over prefix + chain (plain torch SDPA on the
    contiguous, gathered K/V; GQA by repeating KV heads)."""
    n, p, hq, hkv = 6, 14, 4, 2
    case = make_case(
        q_lens=[n],
        prefixes=[p],
        hq=hq,
        hkv=hkv,
        dtype=torch.float32,
        trees=[chain_parents(n)],
        device=device,
    )
    out = tree_attention(*case.args())
    k, v = case.kv(0)  # [p + n, Hkv, D]
    k = k.repeat_interleave(hq // hkv, 1).transpose(0, 1)  # [Hq, kv, D]
    v = v.repeat_interleave(hq // hkv, 1).transpose(0, 1)
    allowed = torch.ones(n, p + n, dtype=torch.bool, device=k.device).tril(diagonal=p)
    ref = F.scaled_dot_product_attention(case.q.transpose(0, 1), k, v, attn_mask=allowed)
    _close(out, ref.transpose(0, 1), torch.float32)


def test_star_sees_prefix_root_and_itself(device: str) -> None:
    """Property: in a star, leaf i attends to exactly prefix + root + i."""
    n, p = 5, 9
    case = make_case(
        q_lens=[n],
        prefixes=[p],
        hq=2,
        hkv=1,
        dtype=torch.float32,
        trees=[star_parents(n)],
        device=device,
    )
    out = tree_attention(*case.args())
    k, v = case.kv(0)
    d = case.q.shape[-1]
    for i in range(n):
        keep = list(range(p)) + sorted({p, p + i})
        s = torch.einsum("hd,nd->hn", case.q[i].float(), k[keep, 0].float()) / math.sqrt(d)
        ref = s.softmax(-1) @ v[keep, 0].float()
        torch.testing.assert_close(out[i].float(), ref, rtol=1e-4, atol=1e-4)


def test_split_kv_matches_single_pass(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    trees = [random_parents(4, gen), [-1], chain_parents(3)]
    case = make_case(
        q_lens=[4, 1, 3],
        prefixes=[70, 37, 0],
        hq=4,
        hkv=2,
        bs=16,
        dtype=torch.float32,
        trees=trees,
        device=device,
    )
    ref = tree_attention_ref(*case.args())
    for splits in (2, 3):
        _close(tree_attention(*case.args(), num_splits=splits, block_n=16), ref, torch.float32)


def test_custom_scale_and_strided_q(device: str) -> None:
    case = make_case(
        q_lens=[3, 2],
        prefixes=[6, 0],
        hq=4,
        hkv=2,
        dtype=torch.float32,
        trees=[chain_parents(3), star_parents(2)],
        device=device,
    )
    fused = torch.cat([case.q, torch.zeros_like(case.q)], dim=1)  # q as a view: [T, 2Hq, D]
    q = fused[:, :4]
    assert not q.is_contiguous()
    args = (q, *case.args()[1:])
    _close(tree_attention(*args, scale=0.3), tree_attention_ref(*args, scale=0.3), torch.float32)


def test_rejects_bad_inputs(device: str) -> None:
    case = make_case(q_lens=[2], prefixes=[3], hq=3, hkv=2, trees=[chain_parents(2)], device=device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tree_attention(*case.args())
    case = make_case(q_lens=[2], prefixes=[3], trees=[chain_parents(2)], device=device)
    with pytest.raises(ValueError, match="cu_q must be int32"):
        tree_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.cu_q.long(),
            case.prefix_lens,
            case.block_tables,
        )
    with pytest.raises(ValueError, match="dtypes differ"):
        tree_attention(case.q.float(), *case.args()[1:])
    with pytest.raises(ValueError, match="mask_words"):
        tree_attention(*case.args()[:-1], case.mask_words[:1])


def test_prefill_chunk_and_tree_share_one_masked_launch(device: str) -> None:
    """A mask covers every row: a 37-row prefill chunk gives its rows causal words (two words
    per row), a tree gives its ancestor words; one launch serves both."""
    gen = torch.Generator().manual_seed(37)
    trees = [chain_parents(37), random_parents(8, gen), [-1]]
    case = make_case(
        q_lens=[37, 8, 1], prefixes=[24, 5, 50], hq=4, hkv=2, bs=16, trees=trees, device=device
    )
    out = tree_attention(*case.args(), max_q_len=37)
    _close(out, tree_attention_ref(*case.args()), torch.float16)
    causal = tree_attention(*case.args()[:-1], max_q_len=37)  # mask=None: causal everywhere
    torch.testing.assert_close(out[:37], causal[:37], rtol=0, atol=0)
