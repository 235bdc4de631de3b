"""Triton kernels for specd: per op a module with kernel + launcher + plain-torch reference.

    from kernels.tree_attention import tree_attention
    from kernels.tree_attention_ref import tree_attention_ref
    from kernels.tree_masks import ancestor_words, causal_mask_words, pack_mask_words
    from kernels.kv_cache import write_kv, compact_kv, copy_blocks (+ *_ref)
    from kernels.verify import verify_greedy, verify_greedy_ref

Tree attention's reference and its mask-word helpers sit in their own modules beside it,
which import no triton (CPU code and tests' expected values need only torch).

Nothing is re-exported here: `kernels.tree_attention` must stay the module (a re-exported
function of the same name would shadow it). Modules import nothing from `server/`. On CUDA the
model runner calls the launchers; on CPU the `*_ref` functions (tests run the launchers under
TRITON_INTERPRET=1).
"""
