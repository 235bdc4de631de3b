"""Triton kernels for specd, each module holding kernel + launcher + plain-torch reference.

    from kernels.tree_attention import tree_attention, tree_attention_ref
    from kernels.kv_cache import write_kv, compact_kv, copy_blocks (+ *_ref)
    from kernels.verify import verify_greedy, verify_greedy_ref

Nothing is re-exported here: `kernels.tree_attention` must stay the module (a re-exported
function of the same name would shadow it). Modules import nothing from `server/`. On CUDA the
model runner calls the launchers; on CPU the `*_ref` functions (tests run the launchers under
TRITON_INTERPRET=1).
"""
