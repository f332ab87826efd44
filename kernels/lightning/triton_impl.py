"""Host side of the Triton path: segment tables and launches (the torch custom ops around them: ops.py).

Imported lazily (it imports triton)."""
from __future__ import annotations

import functools

import torch
import triton

from . import triton_kernels as K

CHUNK = 64
# Segment length (tokens, a multiple of CHUNK); None picks one so that about PROGRAMS_PER_SM programs per SM
# walk the sequence. Longer segments move fewer state bytes, shorter ones fill the GPU at small B·H.
SEGMENT_LEN: int | None = None
PROGRAMS_PER_SM = 4
MIN_SEGMENT = 4 * CHUNK
# Tests set this: outputs start as NaN, so a token a kernel never writes cannot pass.
POISON_OUTPUTS = False
# Launch settings, adjustable for tuning (bench/lightning.py). Chunks: `fwd` and `bwd` are the C of the masked
# C×C products; `sum` only tiles the segment sums (no C×C product there). None picks by head dim.
# The defaults are the settings of the recorded benchmark (the newest bench/results/lightning-*.json).
TUNE = {"fwd_chunk": 64, "fwd_bv": None, "fwd_warps": None, "fwd_stages": 3, "sum_chunk": 64,
        "sum_warps": None, "sum_stages": 2, "bwd_chunk": 64, "bwd_warps": None, "bwd_stages": 3}
SCAN_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _segment_len(total_tokens: int, heads: int, device: torch.device) -> int:
    if SEGMENT_LEN is not None:
        return SEGMENT_LEN
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    per_program = triton.cdiv(total_tokens * heads, PROGRAMS_PER_SM * sms)
    return max(MIN_SEGMENT, triton.cdiv(per_program, CHUNK) * CHUNK)


class Segments:
    """Segment table: token start and length of every segment, and each sequence's first segment."""

    def __init__(self, lengths: list[int], seg_len: int, device):
        starts, lens, first = [], [], [0]
        offset = 0
        for n in lengths:
            for s in range(0, n, seg_len):
                starts.append(offset + s)
                lens.append(min(seg_len, n - s))
            offset += n
            first.append(len(starts))
        table = torch.tensor([starts, lens], dtype=torch.int32).to(device)
        self.start, self.length = table[0], table[1]
        self.seq_first = torch.tensor(first, dtype=torch.int32).to(device)
        self.num = len(starts)
        self.num_seqs = len(lengths)


@functools.lru_cache(maxsize=64)
def _segments_cached(lengths: tuple, seg_len: int, device) -> Segments:
    return Segments(list(lengths), seg_len, device)


def make_segments(batch: int, seqlen: int, heads: int, cu_seqlens, device) -> Segments:
    if cu_seqlens is None:
        lengths = (seqlen,) * batch
    else:
        cu = cu_seqlens.tolist()  # a host sync when cu_seqlens is on the GPU; none from a CPU copy
        lengths = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    return _segments_cached(lengths, _segment_len(sum(lengths), heads, device), device)


def _chunk(stage: str, dp: int) -> int:
    # head dims above 128 keep C = 64: larger C×C tiles next to [256, ·] state tiles overflow shared memory
    return TUNE[f"{stage}_chunk"] if dp <= 128 else min(TUNE[f"{stage}_chunk"], 64)


def _launch_opts(dp: int, stage: str, ieee: bool = False):
    warps = TUNE[f"{stage}_warps"] or (8 if dp >= 128 else 4)
    stages = TUNE[f"{stage}_stages"]
    if ieee or dp > 128:  # fp32 tiles or wide heads: a third pipeline stage overflows shared memory or registers
        stages = min(stages, 2)
    return {"num_warps": warps, "num_stages": stages}


def _new(like, shape, dtype):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _segment_sum(a, b, g, segs, alpha, from_end, ieee):
    _, H, D = a.shape
    dp = triton.next_power_of_2(max(D, 16))
    blk = min(dp, 128)
    out = _new(a, (segs.num, H, D, D), torch.float32)
    if segs.num:
        grid = (segs.num, H, triton.cdiv(D, blk) ** 2)
        K.segment_sum_kernel[grid](a, b, g, segs.start, segs.length, out, alpha, H=H, D=D, C=_chunk("sum", blk),
                                   BK=blk, BV=blk, FROM_END=from_end, IEEE=ieee, **_launch_opts(blk, "sum", ieee))
    return out


def _state_scan(buf, g, segs, init, want_final, reverse):
    _, H, D, _ = buf.shape
    final = _new(buf, (segs.num_seqs, H, D, D), torch.float32) if want_final else None
    grid = (segs.num_seqs, H, triton.cdiv(D * D, SCAN_BLOCK))
    K.state_scan_kernel[grid](buf, g, segs.length, segs.seq_first, init if init is not None else buf,
                              final if final is not None else buf, H=H, D=D, BLOCK=SCAN_BLOCK,
                              HAS_INIT=init is not None, STORE_FINAL=want_final, REVERSE=reverse, num_warps=4)
    return final


def forward(q, k, v, g, h0, scale, want_final, segs):
    """q, k, v: [NT, H, D] packed. Returns o, final state, start states of the segments (for backward)."""
    _, H, D = q.shape
    dp = triton.next_power_of_2(max(D, 16))
    ieee = q.dtype == torch.float32
    states = _segment_sum(k, v, g, segs, 1.0, True, ieee)
    final = _state_scan(states, g, segs, h0, want_final, reverse=False)
    o = _new(q, q.shape, q.dtype)
    bv = TUNE["fwd_bv"] or (dp if dp <= 128 else 64)
    if segs.num:
        K.chunk_output_kernel[(segs.num, H, triton.cdiv(D, bv))](
            q, k, v, o, g, segs.start, segs.length, states, scale, H=H, D=D, DP=dp, C=_chunk("fwd", dp), BA=bv,
            STATE_T=True, IEEE=ieee, **_launch_opts(max(dp, bv), "fwd", ieee))
    return o, final, states


def backward(q, k, v, g, do, dht, states, scale, want_dh0, segs):
    _, H, D = q.shape
    dp = triton.next_power_of_2(max(D, 16))
    ieee = q.dtype == torch.float32
    dstates = _segment_sum(q, do, g, segs, scale, False, ieee)
    dh0 = _state_scan(dstates, g, segs, dht, want_dh0, reverse=True)
    dq, dk, dv = (_new(q, q.shape, q.dtype) for _ in range(3))
    if segs.num:
        # one program per (segment, head, block of output columns); the other operand's columns all in registers
        opts, C, blk = _launch_opts(dp, "bwd", ieee), _chunk("bwd", dp), dp if dp <= 128 else 64
        grid = (segs.num, H, triton.cdiv(D, blk))
        table = (g, segs.start, segs.length)
        K.chunk_output_kernel[grid](do, v, k, dq, *table, states, scale, H=H, D=D, DP=dp, C=C, BA=blk,
                                    STATE_T=False, IEEE=ieee, **opts)
        # fp32 tiles of a 256-wide head: two pipeline stages of the dK/dV kernel need 272 KB of shared memory,
        # more than a Hopper GPU has (227 KB)
        dkdv_opts = dict(opts, num_stages=1) if ieee and dp > 128 else opts
        for a, b, c, out, transposed in ((q, do, v, dk, False), (do, q, k, dv, True)):
            K.chunk_dkdv_kernel[grid](a, b, c, out, *table, dstates, scale, H=H, D=D, DP=dp, C=C, BA=blk,
                                      STATE_T=transposed, IEEE=ieee, **dkdv_opts)
    return dq, dk, dv, dh0


def num_segments(batch: int, seqlen: int, heads: int, device) -> int:
    """Segments of `batch` unpacked rows of `seqlen` tokens: the row count of the saved segment start states."""
    return batch * triton.cdiv(seqlen, _segment_len(batch * seqlen, heads, device))


def decode(q, k, v, g, state, *, scale):
    B, H, D = q.shape
    dp = triton.next_power_of_2(max(D, 16))
    bv = min(dp, 32)
    o = _new(q, q.shape, q.dtype)
    new_state = _new(q, state.shape, torch.float32)
    g = g.detach().to(device=q.device, dtype=torch.float32).contiguous()
    K.decode_kernel[(B * H, triton.cdiv(D, bv))](q.contiguous(), k.contiguous(), v.contiguous(), g,
                                                 state.float().contiguous(), o, new_state, float(scale), H=H, D=D,
                                                 DP=dp, BV=bv, num_warps=4)
    return o, new_state
