"""The one place attention is computed, so kernels can be swapped without touching models.

Self-attention (the LLM's causal rows, packed rows of several samples, a vision tower's
patches) runs one of these kernels; all give the same result up to rounding:
- `flash2`: flash-attn 2 (`flash_attn`; CUDA fp16/bf16; packed rows: its variable-length kernel);
- `flash4`: flash-attn 4 (`flash_attn.cute`, the flash-attn-4 wheel: `mmscale[gpu]`), likewise,
  on Hopper or newer;
- `torch_varlen`: PyTorch's own variable-length kernel (torch.nn.attention.varlen: FlashAttention
  inside libtorch, nothing to install; CUDA fp16/bf16);
- `flex`: FlexAttention with a document mask, compiled on first use (CPU: forward only);
- `sdpa`: PyTorch SDPA; packed rows are one call per sample on CPU and a block-diagonal mask on
  CUDA (whose grouped K/V heads are repeated, so a fused kernel takes the mask).
`auto` takes the first that can run the call: flash2, flash4, then torch_varlen for packed
rows, then sdpa. A model's layers carry the kernel they run (`set_kernel`); training takes it
from `model.attention` and checks at start-up that it can run (`unavailable`). Masked attention
(cross-attention, Mllama's tiles, decoding from a cache) is always SDPA, `masked_attention`.
A model builds one `PackedLayout` per forward with `pack_layout` and hands it to every layer,
so the mask, offsets or block mask are derived once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config.model import AttentionKernel

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # CPU machines, and clusters installed without the "gpu" extra
    flash_attn_func = flash_attn_varlen_func = None
try:  # a pure-Python wheel (CuTe DSL kernels compiled when first called), for Hopper and Blackwell
    from flash_attn.cute import flash_attn_func as flash4_func
    from flash_attn.cute import flash_attn_varlen_func as flash4_varlen_func
except ImportError:
    flash4_func = flash4_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch before 2.5
    BlockMask = create_block_mask = flex_attention = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # the largest head dimension flash-attn 2 has kernels for
KERNELS: tuple[str, ...] = get_args(AttentionKernel)
LABELS = {"flash2": "flash-attn 2", "flash4": "flash-attn 4", "torch_varlen": "torch varlen_attn",
          "flex": "FlexAttention", "sdpa": "SDPA"}


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Which tokens of a batch of packed rows belong together.

    `segment_ids` (batch, seq) numbers the samples of a row 1..n, each a contiguous run, and
    marks the row's trailing padding 0. A token attends only to tokens of its own sample
    (and, if `causal`, only to earlier ones). `both_ways` (batch, seq) bool marks tokens that
    see each other in both directions within their sample, causal or not (Molmo2's image
    tokens); only masks say that, so such layouts run on SDPA with a mask or FlexAttention.
    The views each kernel needs are derived on first use and cached, so a forward pays only
    for the kernel it runs.
    """

    segment_ids: torch.Tensor
    causal: bool = True
    both_ways: torch.Tensor | None = None

    @cached_property
    def mask(self) -> torch.Tensor:
        """SDPA's boolean mask (batch, 1, seq, seq): True where a query may see a key."""
        ids = self.segment_ids
        same = ids[:, :, None] == ids[:, None, :]
        if not self.causal:
            return same[:, None]
        seen = torch.ones_like(same).tril()
        if self.both_ways is not None:
            seen = seen | (self.both_ways[:, :, None] & self.both_ways[:, None, :])
        return (same & seen)[:, None]

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """flash-attn's int32 offsets (segments + 1,) of each run in the flattened batch * seq tokens.

        A row's trailing padding counts as one more run: every token keeps its place, so
        the kernel needs no unpad/repad gather, and padding sees only padding.
        """
        ids = self.segment_ids
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        offsets = starts.flatten().nonzero().flatten()
        end = torch.tensor([ids.numel()], device=ids.device)
        return torch.cat([offsets, end]).to(torch.int32)

    @cached_property
    def max_seqlen(self) -> int:
        return int(self.cu_seqlens.diff().max())

    @cached_property
    def block_mask(self) -> "BlockMask":
        """FlexAttention's block-sparse mask: the blocks a query block may see, so the kernel
        skips whole blocks of other samples (and, if causal, of later tokens)."""
        ids, causal, both_ways = self.segment_ids, self.causal, self.both_ways

        def same_sample(b, h, q, kv):
            same = ids[b, q] == ids[b, kv]
            if not causal:
                return same
            if both_ways is None:
                return same & (q >= kv)
            return same & ((q >= kv) | (both_ways[b, q] & both_ways[b, kv]))

        batch, seq = ids.shape
        return create_block_mask(same_sample, batch, None, seq, seq, device=ids.device)


def pack_layout(
    segment_ids: torch.Tensor | None, causal: bool = True, both_ways: torch.Tensor | None = None
) -> PackedLayout | None:
    """The layout of packed rows, or None for rows that hold one (right-padded) sample each
    (and no `both_ways` tokens: those need a layout, whose single segment is the row)."""
    if both_ways is not None and segment_ids is None:
        segment_ids = torch.ones_like(both_ways, dtype=torch.long)
    if segment_ids is None:
        return None
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (batch, seq), got shape {tuple(segment_ids.shape)}")
    return PackedLayout(segment_ids, causal, both_ways)


def _flash_shaped(q: torch.Tensor) -> bool:
    """CUDA fp16/bf16 queries with heads the flash kernels have, on Ampere or newer (their floor)."""
    return (q.is_cuda and q.dtype in FLASH_DTYPES and q.shape[-1] <= FLASH_MAX_HEAD_DIM
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def use_flash(q: torch.Tensor) -> bool:
    """Whether `attention` runs flash-attn for these queries."""
    return flash_attn_func is not None and _flash_shaped(q)


def use_flash4(q: torch.Tensor) -> bool:
    """Whether `attention` runs flash-attn 4 for these queries (when flash-attn 2 does not)."""
    return (flash4_func is not None and _flash_shaped(q) and q.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def use_torch_varlen(q: torch.Tensor) -> bool:
    """Whether `attention` runs PyTorch's variable-length kernel for packed rows of these queries."""
    return varlen_attn is not None and _flash_shaped(q)


def pick(kernel: str, q: torch.Tensor, packed: bool) -> str:
    """The kernel `attention(..., kernel=kernel)` runs for queries like `q` (packed rows or not)."""
    if kernel != "auto":
        return kernel
    if use_flash(q):
        return "flash2"
    if use_flash4(q):
        return "flash4"
    return "torch_varlen" if packed and use_torch_varlen(q) else "sdpa"


def unavailable(kernel: str, device: torch.device | str, dtype: torch.dtype, head_dims: list[int],
                backward: bool = True) -> str | None:
    """Why `kernel` cannot serve self-attention with heads of `head_dims` in `dtype` on `device`
    (and its backward pass, if `backward`), or None when it can."""
    device = torch.device(device)
    if kernel in ("auto", "sdpa"):
        return None
    if kernel == "flex":
        if flex_attention is None:
            return "this torch has no FlexAttention (torch >= 2.5)"
        if backward and device.type == "cpu":
            return "FlexAttention has no backward pass on CPU (torch 2.13); train with sdpa there"
        return None
    label = LABELS[kernel]
    installed = {"flash2": flash_attn_func, "flash4": flash4_func, "torch_varlen": varlen_attn}[kernel]
    if installed is None:
        return {"flash2": "flash-attn 2 is not installed (pip install flash-attn --no-build-isolation: see README)",
                "flash4": "flash-attn 4 is not installed (pip install 'mmscale[gpu]')",
                "torch_varlen": "this torch has no torch.nn.attention.varlen (torch >= 2.10)"}[kernel]
    if device.type != "cuda":
        return f"{label} runs on CUDA GPUs only, not {device.type}"
    if dtype not in FLASH_DTYPES:
        return f"{label} needs bf16 or fp16, not {str(dtype).removeprefix('torch.')} (train.precision=bf16)"
    if max(head_dims) > FLASH_MAX_HEAD_DIM:
        return f"{label} has kernels for heads up to {FLASH_MAX_HEAD_DIM} wide; this model's are {head_dims}"
    major, minor = torch.cuda.get_device_capability(device)
    floor = 9 if kernel == "flash4" else 8
    if major < floor:
        return f"{label} needs compute capability {floor}.0 or newer ({'Hopper' if floor == 9 else 'Ampere'}), " \
               f"this GPU has {major}.{minor}"
    if kernel == "flash4" and any(dim % 8 for dim in head_dims):
        return f"flash-attn 4 needs heads a multiple of 8 wide; this model's are {head_dims}"
    return None


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Make every self-attention layer of `model` run `kernel`; returns how many there are."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is none of {', '.join(KERNELS)}")
    layers = [m for m in model.modules() if hasattr(m, "attention_kernel")]
    for layer in layers:
        layer.attention_kernel = kernel
    return len(layers)


def kernel_report(device: torch.device | str, dtype: torch.dtype, llm_head_dim: int, vision_head_dim: int | None,
                  packed: bool, kernel: str = "auto", both_ways: bool = False) -> str:
    """Which kernel serves each kind of attention of a model in `dtype` on `device` whose
    self-attention layers run `kernel` (the run's start-up says it): the decoder's causal
    self-attention, its packed rows, a vision tower's (`vision_head_dim`; None: a tower that
    attends with masks, Mllama's tiles), and the masked attention of cross-attention layers
    and decoding. `both_ways`: the LLM's image tokens see each other both ways (Molmo2), which
    only masks say."""
    device = torch.device(device)

    def served(dim: int, rows_of_samples: bool = False, llm: bool = False) -> str:
        if llm and both_ways:  # as `attention` dispatches layouts with both-ways tokens
            return "FlexAttention with a mask" if kernel == "flex" else "SDPA with a mask"
        q = torch.empty(1, 1, 1, dim, device=device, dtype=dtype)
        name = pick(kernel, q, rows_of_samples)
        if not rows_of_samples:
            return LABELS[name]
        if name == "sdpa":
            return "SDPA with a block-diagonal mask" if q.is_cuda else "SDPA, one call per sample"
        suffix = {"flash2": " varlen", "flash4": " varlen", "flex": " with a document mask"}.get(name, "")
        return LABELS[name] + suffix

    parts = [f"LLM self-attention {served(llm_head_dim, llm=True)}" + (" (image tokens both ways)" if both_ways else "")]
    if packed:
        parts.append(f"packed rows {served(llm_head_dim, rows_of_samples=True, llm=True)}")
    parts.append(f"vision tower {served(vision_head_dim)}" if vision_head_dim else "vision tower SDPA with tile masks")
    parts.append("cross-attention and decoding SDPA with masks (grouped K/V heads repeated)")
    chosen = "" if kernel == "auto" else f", model.attention={kernel}"
    return f"attention ({str(dtype).removeprefix('torch.')} on {device.type}{chosen}): " + "; ".join(parts)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """q: (batch, heads, seq, dim); k, v: (batch, kv_heads, kv_seq, dim), heads % kv_heads == 0.

    Returns (batch, heads, seq, dim). Without `layout`, rows are single right-padded
    samples, which need no mask under causal attention: real tokens never see the padding
    that follows them, and padded positions carry no loss. Causal attention needs
    seq == kv_seq, and packed rows (a `layout`) need it too. `kernel`: one of KERNELS.
    """
    _check_shapes(q, k, causal, layout)
    if layout is not None and layout.both_ways is not None:
        # Tokens that see each other both ways under causal attention: only a mask says that,
        # so the variable-length kernels cannot serve it (train.check_attention_kernel refuses them).
        return flex_attention_call(q, k, v, causal, layout) if kernel == "flex" else masked_attention(q, k, v, layout.mask)
    return RUNNERS[pick(kernel, q, layout is not None)](q, k, v, causal, layout)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, causal: bool, layout: PackedLayout | None) -> None:
    if (causal or layout is not None) and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal or packed attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if layout is not None and layout.causal != causal:
        raise ValueError(f"attention(causal={causal}) got a layout built with causal={layout.causal}")


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None
) -> torch.Tensor:
    """`attention` through PyTorch SDPA; runs anywhere."""
    if layout is None:
        if q.is_cuda and not _flash_shaped(q):
            # CUDA's flash kernel (fp16/bf16) takes grouped heads; the memory-efficient one, which
            # serves the rest, rejects enable_gqa, which would leave the math kernel.
            k, v = _repeat_kv(k, v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    if not q.is_cuda:
        return segment_attention(q, k, v, causal, layout)
    return masked_attention(q, k, v, layout.mask)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout
) -> torch.Tensor:
    """Packed rows as flash-attn's variable-length kernel runs them: one SDPA call per sample.

    PyTorch's variable-length kernel (torch.nn.attention.varlen) is CUDA-only, and a dense
    block-diagonal mask makes SDPA compute every row's whole (seq x seq) square, most of it
    masked, and forgo the causal kernel's skipping of the upper triangle; one call per run of
    `cu_seqlens` computes each sample's own causal square alone. The loop costs a Python call
    per sample and layer, little beside the work on CPU; on CUDA flash-attn's kernel does this.
    """
    batch, heads, seq, dim = q.shape
    # (1, heads, batch * seq, dim): SDPA's CPU flash kernel takes 4-D inputs only (3-D ones run
    # the math kernel, scores and all).
    flat_q, flat_k, flat_v = (t.transpose(0, 1).reshape(1, t.shape[1], batch * seq, dim) for t in (q, k, v))
    # split, not one slice per sample: a slice's backward writes its gradient into a zeroed tensor of
    # the whole row, split's backward concatenates them once.
    lengths = layout.cu_seqlens.diff().tolist()
    gqa = k.shape[1] != heads
    out = torch.cat([
        F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=causal, enable_gqa=gqa)
        for q_i, k_i, v_i in zip(*(t.split(lengths, dim=2) for t in (flat_q, flat_k, flat_v)))
    ], dim=2)
    return out.view(heads, batch, seq, dim).transpose(0, 1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention with an explicit mask (boolean: True = may attend; or additive), through SDPA.

    q: (batch, heads, seq, dim); k, v: (batch, kv_heads, kv_seq, dim). For what `attention`'s
    causal/packed layouts cannot say: Mllama's tile padding and cross-attention, and decoding
    from a KV cache, where a few new queries meet every earlier key of rows of different
    lengths (flash-attn has a kernel for that, flash_attn_with_kvcache, but generation here
    serves evaluation, whose time goes to the prompt's forward). Every query row should allow
    at least one key: what a fused kernel gives for a row with none differs between kernels.

    Grouped kv heads are repeated up to the query heads rather than passed with enable_gqa:
    on CUDA (torch 2.13) flash takes no mask and the memory-efficient kernel rejects
    enable_gqa (cuDNN takes both, but is tried first only on some GPUs and cuDNN versions), so
    grouped heads with a mask ran the math kernel and its fp32 (batch, heads, seq, kv_seq)
    scores, ~13 GB per Llama 3.2 Vision cross-attention layer at micro-batch 8. The copies cost
    kv_seq * heads * dim per row, far less than the scores (the math kernel makes them too).
    FlexAttention would serve grouped heads natively, but is fast only once compiled; SDPA
    needs no compiler and runs the same call on CPU as on CUDA.
    """
    k, v = _repeat_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped K/V heads repeated up to `heads` query heads (as many copies of each as its group has)."""
    groups = heads // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None
) -> torch.Tensor:
    """`attention` through flash-attn; needs the package, CUDA and fp16/bf16. kv heads are native."""
    if flash_attn_func is None:
        raise RuntimeError("flash_attn is not installed (pip install 'mmscale[gpu]')")
    # flash-attn wants (batch, seq, heads, dim); the transposes are views, it reads strides.
    if layout is None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    out = flash_attn_varlen_func(*_tokens(q, k, v), cu, cu, longest, longest, causal=causal)
    return _rows(out, q)


def flash4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None
) -> torch.Tensor:
    """`attention` through flash-attn 4; CUDA fp16/bf16 on Hopper or newer. kv heads are native.
    Its functions return (out, log-sum-exp), and take the varlen offsets by name (the fourth
    positional argument is MLA's `qv`)."""
    if flash4_func is None:
        raise RuntimeError("flash_attn.cute is not installed (pip install flash-attn-4)")
    if layout is None:
        out, _ = flash4_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    out, _ = flash4_varlen_func(*_tokens(q, k, v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                max_seqlen_k=longest, causal=causal)
    return _rows(out, q)


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None
) -> torch.Tensor:
    """`attention` through PyTorch's variable-length kernel (FlashAttention inside libtorch; CUDA
    fp16/bf16), with flash-attn's token layout and offsets; kv heads are native (enable_gqa).
    Rows of one sample each are runs of equal length (no padding mask is needed, as for SDPA)."""
    if varlen_attn is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen (torch >= 2.10)")
    if layout is None:
        batch, seq = q.shape[0], q.shape[2]
        cu, longest = torch.arange(0, (batch + 1) * seq, seq, device=q.device, dtype=torch.int32), seq
    else:
        cu, longest = layout.cu_seqlens, layout.max_seqlen
    window = (-1, 0) if causal else (-1, -1)  # (-1, 0): each token sees every earlier one of its run
    out = varlen_attn(*_tokens(q, k, v), cu, cu, longest, longest, window_size=window,
                      enable_gqa=k.shape[1] != q.shape[1])
    return _rows(out, q)


@cache
def _compiled_flex():
    # Compiled once per process: eager FlexAttention runs a dense reference (scores and all);
    # compiling generates the block-sparse kernel. Dynamic shapes from the first call: every call
    # site (tower, packed rows, single rows; with and without gradients) and every new batch or
    # row length would otherwise add a specialised graph, and past dynamo's recompile limit (8)
    # it falls back to the eager reference.
    return torch.compile(flex_attention, dynamic=True)


@lru_cache(maxsize=8)
def _causal_block_mask(seq: int, device: torch.device) -> "BlockMask":
    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seq, seq, device=device)


def flex_attention_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: PackedLayout | None = None
) -> torch.Tensor:
    """`attention` through FlexAttention: packed rows under the layout's block mask (document ids,
    causal within each), single rows under a causal one or none; kv heads are native."""
    if flex_attention is None:
        raise RuntimeError("this torch has no FlexAttention (torch >= 2.5)")
    if layout is not None:
        block_mask = layout.block_mask
    else:
        block_mask = _causal_block_mask(q.shape[2], q.device) if causal else None
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _tokens(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(batch, heads, seq, dim) -> the variable-length kernels' (batch * seq, heads, dim)."""
    return [t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3]) for t in tensors]


def _rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The kernels' (batch * seq, heads, dim) back to `q`'s (batch, heads, seq, dim)."""
    batch, heads, seq, dim = q.shape
    return out.view(batch, seq, heads, dim).transpose(1, 2)


RUNNERS = {"flash2": flash_attention, "flash4": flash4_attention, "torch_varlen": torch_varlen_attention,
           "flex": flex_attention_call, "sdpa": sdpa_attention}
