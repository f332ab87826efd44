"""InfLLM-V2: trainable block-sparse attention with dense↔sparse switching (SPEC §2).

Layout q [B, T, H, D], k/v [B, T, Hkv, D]. Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1);
without triton everything falls back to the PyTorch reference in naive.py.
"""
from .config import SparseConfig
from .ops import (block_scores, block_sparse_attn, compress_keys, dense_causal_attn, infllm_v2_attn,
                  infllm_v2_decode, infllm_v2_decode_static, select_blocks, topk_blocks, update_compressed_keys,
                  uses_reference, write_decode_kv)

__all__ = ["SparseConfig", "compress_keys", "select_blocks", "block_scores", "block_sparse_attn", "infllm_v2_attn",
           "infllm_v2_decode", "infllm_v2_decode_static", "write_decode_kv", "update_compressed_keys",
           "dense_causal_attn", "topk_blocks", "uses_reference"]
