"""Sizes of InfLLM-V2 sparse attention (SPEC §2). Every size is a parameter; the defaults are MiniCPM4 / MiniCPM-SALA."""
from dataclasses import dataclass


@dataclass(frozen=True)
class SparseConfig:
    block_size: int = 64      # tokens per K/V block that attention selects
    kernel_size: int = 32     # keys averaged into one compressed key
    kernel_stride: int = 16   # distance between compressed keys
    topk: int = 64            # blocks picked by score, on top of the local window
    init_blocks: int = 1      # leading blocks always attended (attention sink)
    window: int = 2048        # local window: the query's own block and window // block_size blocks before it
    pool_window: int = 5      # max-pooling of kernel scores onto blocks
    pool_stride: int = 4
    pool_padding: int = 1
    dense_len: int = 8192     # below this key length the layer runs dense causal attention
    # The paper's "LSE approximation": take each head's softmax normaliser over coarse kernels (size, stride;
    # 128, 64 in the paper) instead of a first pass over the fine ones. 0, 0: the exact two-pass normaliser.
    lse_kernel_size: int = 0
    lse_kernel_stride: int = 0

    def __post_init__(self):
        if self.window % self.block_size:
            raise ValueError("window must be a multiple of block_size")
        if self.k_total < self.init_blocks + self.local_blocks:
            raise ValueError("k_total must cover the forced init and local blocks, or ties among them decide")
        if self.approx_lse and (self.lse_kernel_stride <= 0 or self.lse_kernel_size % self.kernel_size
                                or self.lse_kernel_stride % self.kernel_stride
                                or self.kernel_size % self.kernel_stride):
            # then a coarse kernel is exactly the mean of whole fine kernels (see naive.coarse_keys)
            raise ValueError("lse_kernel_size must be a multiple of kernel_size, lse_kernel_stride a positive "
                             "multiple of kernel_stride, and kernel_size a multiple of kernel_stride")
        if not self.approx_lse and self.lse_kernel_stride:
            raise ValueError("lse_kernel_stride needs lse_kernel_size")

    @property
    def local_blocks(self) -> int:
        """Forced local blocks: the query's own block and the window // block_size blocks before it."""
        return self.window // self.block_size + 1

    @property
    def approx_lse(self) -> bool:
        return self.lse_kernel_size > 0

    def n_coarse_kernels(self, seq_len: int) -> int:
        """Coarse kernels (the approximate normaliser's) that exist after seq_len keys."""
        if seq_len < self.lse_kernel_size:
            return 0
        return (seq_len - self.lse_kernel_size) // self.lse_kernel_stride + 1

    @property
    def k_total(self) -> int:
        """Selected blocks per (KV head, query token): topk + window // block_size (96 by default)."""
        return self.topk + self.window // self.block_size

    def n_kernels(self, seq_len: int) -> int:
        """Compressed keys that exist after seq_len keys: full kernels only."""
        if seq_len < self.kernel_size:
            return 0
        return (seq_len - self.kernel_size) // self.kernel_stride + 1

    def n_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.block_size)
