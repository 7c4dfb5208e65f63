"""The attention dispatch: packed rows give what each sample gives alone, on every kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmscale.config.model import LLMConfig
from mmscale.models import attention as attn
from mmscale.models.attention import PackedLayout, attention, masked_attention, pack_layout, sdpa_attention
from mmscale.models.llama import LlamaLM

LENGTHS = (5, 9, 3)  # three samples of different lengths, packed into one row
HEADS, KV_HEADS, DIM = 4, 2, 16


def _segments(lengths: tuple[int, ...], pad: int = 0) -> torch.Tensor:
    ids = [torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(pad, dtype=torch.long)]
    return torch.cat(ids)


def _positions(lengths: tuple[int, ...], pad: int = 0) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])


def _qkv(seq: int, batch: int = 1, dtype=torch.float32, device="cpu", kv_seq: int | None = None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, seq, DIM, generator=g)
    k, v = (torch.randn(batch, KV_HEADS, kv_seq or seq, DIM, generator=g) for _ in range(2))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


# fp32 gradients summed in another order: up to 1.5e-6 apart over 200 draws of the weights below.
GRAD_TOLERANCE = 5e-6


def _weights(out: torch.Tensor) -> torch.Tensor:
    """Fixed random weights of an output, so that a gradient check sees the same sums every run."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1))


def _per_sample(fn, q, k, v, causal):
    """`fn` run on each sample of the packed row alone, concatenated back in row order."""
    outs, start = [], 0
    for n in LENGTHS:
        part = slice(start, start + n)
        outs.append(fn(q[:, :, part], k[:, :, part], v[:, :, part], causal))
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_equals_each_sample_alone(causal):
    q, k, v = _qkv(sum(LENGTHS))
    packed = attention(q, k, v, causal, pack_layout(_segments(LENGTHS)[None], causal))
    alone = _per_sample(attention, q, k, v, causal)
    assert (packed - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_per_sample_attention_equals_the_block_diagonal_mask_with_gradients(causal):
    """CPU's packed path (one SDPA call per sample) against the dense mask it replaced: two rows,
    trailing padding, grouped heads; outputs and q/k/v gradients in fp32."""
    segments = torch.stack([_segments(LENGTHS, pad=4), _segments((8, 13))])
    layout = pack_layout(segments, causal)
    q, k, v = (t.requires_grad_() for t in _qkv(segments.shape[1], batch=2))
    per_sample = attn.segment_attention(q, k, v, causal, layout)
    masked = masked_attention(q, k, v, layout.mask)
    assert (per_sample - masked).abs().max() <= 1e-6
    weights = _weights(masked)
    for ours, theirs in zip(torch.autograd.grad((per_sample * weights).sum(), (q, k, v)),
                            torch.autograd.grad((masked * weights).sum(), (q, k, v))):
        assert (ours - theirs).abs().max() <= GRAD_TOLERANCE
    assert torch.equal(sdpa_attention(q, k, v, causal, layout), per_sample)  # what CPU runs


# ---- the CUDA kernels' wiring, through reference implementations of their interfaces --------


def _runs(cu_q, cu_k, max_q, max_k, q, k):
    """The checks every variable-length kernel makes of its arguments, then its runs."""
    assert q.dim() == k.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q[0] == 0 and cu_q[-1] == q.shape[0] and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int(cu_q.diff().max())
    return zip(cu_q[:-1].tolist(), cu_q[1:].tolist())


def _alone(q, k, v, causal):
    """One run, (tokens, heads, dim), through SDPA with grouped heads."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def reference_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """flash_attn_varlen_func's interface (flash-attn 2), computed by SDPA one run at a time."""
    return torch.cat([_alone(q[a:b], k[a:b], v[a:b], causal) for a, b in _runs(cu_q, cu_k, max_q, max_k, q, k)])


def reference_flash_attn_func(q, k, v, causal=False):
    """flash_attn_func's interface (flash-attn 2): (batch, seq, heads, dim) in and out."""
    assert q.dim() == 4 and q.shape[2] % k.shape[2] == 0
    return torch.stack([_alone(q[i], k[i], v[i], causal) for i in range(q.shape[0])])


def reference_flash4_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False):
    """flash_attn.cute.flash_attn_func's interface (flash-attn 4): (out, log-sum-exp)."""
    assert qv is None and gather_kv_indices is None and softmax_scale is None
    return reference_flash_attn_func(q, k, v, causal), None


def reference_flash4_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                 max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None, causal=False):
    """flash_attn.cute.flash_attn_varlen_func's interface (flash-attn 4): offsets by name, (out, log-sum-exp)."""
    assert qv is None and seqused_q is None and seqused_k is None
    out = reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return out, None


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's interface (CUDA only), computed by SDPA one run at a time."""
    assert window_size in ((-1, -1), (-1, 0)) and enable_gqa == (k.shape[1] != q.shape[1])
    causal = window_size == (-1, 0)
    return torch.cat([_alone(q[a:b], k[a:b], v[a:b], causal) for a, b in _runs(cu_q, cu_k, max_q, max_k, q, k)])


def _with_reference_kernels(monkeypatch) -> None:
    monkeypatch.setattr(attn, "flash_attn_func", reference_flash_attn_func)
    monkeypatch.setattr(attn, "flash_attn_varlen_func", reference_flash_attn_varlen_func)
    monkeypatch.setattr(attn, "flash4_func", reference_flash4_func)
    monkeypatch.setattr(attn, "flash4_varlen_func", reference_flash4_varlen_func)
    monkeypatch.setattr(attn, "varlen_attn", reference_varlen_attn)


@pytest.mark.parametrize("kernel", ["flash2", "flash4", "torch_varlen"])
@pytest.mark.parametrize("causal", [True, False])
def test_variable_length_kernels_are_wired_as_their_interfaces_want(monkeypatch, kernel, causal):
    """flash-attn's and PyTorch's variable-length kernels run only on CUDA: their wiring (token
    layout, cu_seqlens and max_seqlen, causal flag, grouped heads, the way back to rows) is checked
    here through a reference of each interface, called as `attention(..., kernel=...)` runs it,
    against the dense block-diagonal mask, with gradients, on two rows with trailing padding; and
    on rows of one sample each, against SDPA."""
    _with_reference_kernels(monkeypatch)
    segments = torch.stack([_segments(LENGTHS, pad=4), _segments((8, 13))])
    layout = pack_layout(segments, causal)
    q, k, v = (t.requires_grad_() for t in _qkv(segments.shape[1], batch=2))
    out, masked = attention(q, k, v, causal, layout, kernel=kernel), masked_attention(q, k, v, layout.mask)
    assert (out - masked).abs().max() <= 1e-6
    weights = _weights(masked)
    for ours, theirs in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                            torch.autograd.grad((masked * weights).sum(), (q, k, v))):
        assert (ours - theirs).abs().max() <= GRAD_TOLERANCE
    dense = attention(q, k, v, causal, kernel=kernel)
    assert (dense - sdpa_attention(q, k, v, causal)).abs().max() <= 1e-6


def test_flex_attention_compiled_on_cpu_equals_the_reference():
    """FlexAttention, compiled on CPU (forward only: torch 2.13 has no CPU backward), with the
    layout's document block mask: packed rows with trailing padding and grouped heads, causal
    or not, and single rows; against the dense mask and SDPA in fp32."""
    segments = torch.stack([_segments(LENGTHS, pad=4), _segments((8, 13))])
    q, k, v = _qkv(segments.shape[1], batch=2)
    for causal in (True, False):
        layout = pack_layout(segments, causal)
        out = attention(q, k, v, causal, layout, kernel="flex")
        assert (out - masked_attention(q, k, v, layout.mask)).abs().max() <= 1e-5
        assert (attention(q, k, v, causal, kernel="flex") - sdpa_attention(q, k, v, causal)).abs().max() <= 1e-5
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        attention(*(t.requires_grad_() for t in (q, k, v)), True, pack_layout(segments), kernel="flex")


def test_tokens_marked_both_ways_see_each_other_within_their_sample_only():
    """Molmo2's image tokens: causal attention, except that marked tokens of one sample see each
    other both ways; against a mask written out pair by pair, on SDPA and compiled FlexAttention."""
    segments = torch.stack([_segments(LENGTHS, pad=4), _segments((8, 13))])
    both_ways = torch.zeros_like(segments, dtype=torch.bool)
    both_ways[0, [1, 2, 3, 6, 7, 8, 15]] = True  # a run in sample 1, a run and a lone token in sample 2
    both_ways[1, [0, 4, 5, 9, 10]] = True  # a gap inside sample 1, one run across the boundary
    layout = pack_layout(segments, both_ways=both_ways)
    expected = torch.zeros(2, 1, segments.shape[1], segments.shape[1], dtype=torch.bool)
    for b, i, j in torch.cartesian_prod(torch.arange(2), torch.arange(segments.shape[1]),
                                        torch.arange(segments.shape[1])).tolist():
        same = segments[b, i] == segments[b, j]
        expected[b, 0, i, j] = bool(same and (j <= i or (both_ways[b, i] and both_ways[b, j])))
    assert torch.equal(layout.mask, expected)
    q, k, v = _qkv(segments.shape[1], batch=2)
    reference = masked_attention(q, k, v, expected)
    for kernel in ("auto", "sdpa", "flex", "torch_varlen"):  # the variable-length kernels cannot: masked SDPA
        assert (attention(q, k, v, True, layout, kernel=kernel) - reference).abs().max() <= 1e-5, kernel
    assert (attention(q, k, v, True, pack_layout(segments)) - reference).abs().max() > 1e-2


def test_a_model_runs_the_kernel_it_is_given():
    """`set_kernel` reaches every self-attention layer, and the layers run it: a tiny LLM on
    packed rows (grouped heads, padding) gives the same logits through FlexAttention, flash-attn 2's
    and torch's interfaces (references) as through SDPA."""
    model = _tiny_lm()
    pad = 4
    embeds = torch.randn(2, sum(LENGTHS) + pad, 64, generator=torch.Generator().manual_seed(2))
    positions, segments = _positions(LENGTHS, pad)[None].expand(2, -1), _segments(LENGTHS, pad)[None].expand(2, -1)
    logits = {}
    with torch.no_grad(), pytest.MonkeyPatch.context() as monkeypatch:
        _with_reference_kernels(monkeypatch)
        for kernel in ("sdpa", "flex", "flash2", "torch_varlen"):
            assert attn.set_kernel(model, kernel) == model.cfg.num_layers
            logits[kernel] = model(embeds, positions, segments)
    for kernel in ("flex", "flash2", "torch_varlen"):
        assert (logits[kernel] - logits["sdpa"]).abs().max() <= 1e-5, kernel
    with pytest.raises(ValueError, match="none of auto, flash2"):
        attn.set_kernel(model, "flash3")


def test_unavailable_kernels_say_why(monkeypatch):
    """What training's start-up check refuses, and why, for each kernel in each place."""
    assert attn.unavailable("sdpa", "cpu", torch.float32, [64]) is None
    assert attn.unavailable("auto", "cpu", torch.float32, [64]) is None
    assert "no backward pass on CPU" in attn.unavailable("flex", "cpu", torch.float32, [64])
    assert attn.unavailable("flex", "cpu", torch.float32, [64], backward=False) is None
    monkeypatch.setattr(attn, "flash_attn_func", None)
    assert "flash-attn 2 is not installed" in attn.unavailable("flash2", "cuda", torch.bfloat16, [64])
    _with_reference_kernels(monkeypatch)
    assert "CUDA GPUs only, not cpu" in attn.unavailable("flash2", "cpu", torch.bfloat16, [64])
    _on_cuda(monkeypatch, (8, 0))
    assert "needs bf16 or fp16, not float32" in attn.unavailable("torch_varlen", "cuda", torch.float32, [64])
    assert "heads up to 256 wide; this model's are [128, 512]" in attn.unavailable(
        "flash2", "cuda", torch.bfloat16, [128, 512])
    assert "compute capability 9.0 or newer (Hopper), this GPU has 8.0" in attn.unavailable(
        "flash4", "cuda", torch.bfloat16, [128])
    for kernel in ("flash2", "torch_varlen", "flex"):
        assert attn.unavailable(kernel, "cuda", torch.bfloat16, [128, 64]) is None
    _on_cuda(monkeypatch, (7, 5))  # a T4: below the flash kernels' floor
    assert "compute capability 8.0 or newer (Ampere), this GPU has 7.5" in attn.unavailable(
        "torch_varlen", "cuda", torch.bfloat16, [64])
    _on_cuda(monkeypatch, (9, 0))
    assert "multiple of 8 wide; this model's are [128, 60]" in attn.unavailable(
        "flash4", "cuda", torch.bfloat16, [128, 60])


def _on_cuda(monkeypatch, capability: tuple[int, int] = (9, 0)) -> None:
    """Meta tensors that say they are CUDA ones, on a GPU of `capability`: what the dispatch sees."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "meta"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_the_dispatch_takes_the_first_kernel_that_can_run(monkeypatch):
    """flash-attn 2, then flash-attn 4 (Hopper or newer), then PyTorch's variable-length kernel for
    packed rows, all only for CUDA fp16/bf16 queries; SDPA for the rest."""
    q = torch.empty(1, HEADS, 8, DIM, device="meta", dtype=torch.bfloat16)
    _on_cuda(monkeypatch, (8, 0))
    monkeypatch.setattr(attn, "flash_attn_func", None)
    monkeypatch.setattr(attn, "flash4_func", reference_flash4_func)
    assert attn.use_torch_varlen(q) and not attn.use_flash(q) and not attn.use_flash4(q)  # an A100
    _on_cuda(monkeypatch, (9, 0))
    assert attn.use_flash4(q) and not attn.use_flash4(q.float())
    assert not attn.use_torch_varlen(q.float()) and not attn.use_torch_varlen(torch.empty(1, 1, 1, 8))
    assert not attn.use_flash4(torch.empty(1, 1, 1, 60, device="meta", dtype=torch.bfloat16))  # not a multiple of 8
    _on_cuda(monkeypatch, (7, 5))
    assert not attn.use_torch_varlen(q) and attn.pick("auto", q, True) == "sdpa"
    _on_cuda(monkeypatch, (9, 0))
    assert [attn.pick("auto", q, packed) for packed in (False, True)] == ["flash4", "flash4"]
    monkeypatch.setattr(attn, "flash_attn_func", reference_flash_attn_func)
    assert attn.pick("auto", q, True) == "flash2" and attn.pick("torch_varlen", q, True) == "torch_varlen"
    monkeypatch.setattr(attn, "flash_attn_func", None)
    monkeypatch.setattr(attn, "flash4_func", None)
    assert [attn.pick("auto", q, packed) for packed in (False, True)] == ["sdpa", "torch_varlen"]
    monkeypatch.setattr(attn, "varlen_attn", None)
    assert not attn.use_torch_varlen(q) and attn.pick("auto", q, True) == "sdpa"


def test_the_start_up_report_names_the_kernel_each_attention_runs(monkeypatch):
    cpu = attn.kernel_report("cpu", torch.float32, 64, 32, packed=True)
    assert cpu == ("attention (float32 on cpu): LLM self-attention SDPA; packed rows SDPA, one call per sample; "
                   "vision tower SDPA; cross-attention and decoding SDPA with masks (grouped K/V heads repeated)")
    molmo2 = attn.kernel_report("cpu", torch.float32, 64, 32, packed=True, both_ways=True)
    assert ("LLM self-attention SDPA with a mask (image tokens both ways); packed rows SDPA with a mask; "
            "vision tower SDPA;") in molmo2
    _on_cuda(monkeypatch)
    monkeypatch.setattr(attn, "flash_attn_func", None)
    monkeypatch.setattr(attn, "flash4_func", None)
    cuda = attn.kernel_report("meta", torch.bfloat16, 128, None, packed=True)
    assert "LLM self-attention SDPA; packed rows torch varlen_attn; vision tower SDPA with tile masks" in cuda
    assert "packed rows SDPA with a block-diagonal mask" in attn.kernel_report("meta", torch.float32, 128, 64, True)
    monkeypatch.setattr(attn, "flash_attn_func", reference_flash_attn_func)
    flash = attn.kernel_report("meta", torch.bfloat16, 128, 64, packed=False)
    assert "LLM self-attention flash-attn 2; vision tower flash-attn 2" in flash and "packed" not in flash
    assert "vision tower SDPA" in attn.kernel_report("meta", torch.bfloat16, 128, 512, packed=False)  # heads > 256
    monkeypatch.setattr(attn, "flash_attn_func", None)
    monkeypatch.setattr(attn, "flash4_func", reference_flash4_func)
    assert "LLM self-attention flash-attn 4; packed rows flash-attn 4 varlen" in attn.kernel_report(
        "meta", torch.bfloat16, 128, 64, packed=True)
    named = attn.kernel_report("meta", torch.bfloat16, 128, 64, packed=True, kernel="flex")
    assert named.startswith("attention (bfloat16 on meta, model.attention=flex): LLM self-attention FlexAttention; "
                            "packed rows FlexAttention with a document mask; vision tower FlexAttention;")


def test_sdpa_on_cuda_repeats_grouped_heads_where_its_fused_kernels_would_refuse_them(monkeypatch):
    """SDPA's flash kernel (CUDA fp16/bf16) takes grouped K/V heads; for fp32 the memory-efficient
    kernel serves, which rejects enable_gqa, so the heads are repeated rather than left to the math
    kernel. On CPU, SDPA's own kernels take grouped heads."""
    seen = []

    def recording_sdpa(q, k, v, is_causal=False, enable_gqa=False):
        seen.append((k.shape[1], enable_gqa))
        return q

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    cpu = torch.empty(1, HEADS, 8, DIM)
    attention(cpu, *(torch.empty(1, KV_HEADS, 8, DIM),) * 2, causal=True, kernel="sdpa")
    _on_cuda(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.empty(1, HEADS, 8, DIM, device="meta", dtype=dtype)
        k = torch.empty(1, KV_HEADS, 8, DIM, device="meta", dtype=dtype)
        attention(q, k, k, causal=True, kernel="sdpa")
    assert seen == [(KV_HEADS, True), (HEADS, False), (KV_HEADS, True)]


def test_gqa_matches_repeated_kv_heads():
    q, k, v = _qkv(7)
    repeat = HEADS // KV_HEADS
    expected = attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), causal=True)
    assert torch.allclose(attention(q, k, v, causal=True), expected, atol=1e-6)


def test_non_causal_attention_over_another_length():
    # Cross-attention and the vision tower: queries attend to every key, of any count.
    q, k, v = _qkv(5, kv_seq=11)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(HEADS // KV_HEADS, 1)) / DIM**0.5
    expected = scores.softmax(-1) @ v.repeat_interleave(HEADS // KV_HEADS, 1)
    assert torch.allclose(attention(q, k, v, causal=False), expected, atol=1e-5)


def test_cu_seqlens_cover_samples_rows_and_trailing_padding():
    rows = torch.stack([_segments((2, 3), pad=2), _segments((4, 3))])
    layout = pack_layout(rows)
    # Row 0: samples [0, 2) and [2, 5), padding [5, 7); row 1 starts at 7.
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 7, 11, 14]
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == 4


def test_mask_keeps_samples_apart_and_causal():
    mask = pack_layout(torch.tensor([[1, 1, 2, 0]])).mask[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_layout_is_built_once_and_cached():
    layout = pack_layout(_segments(LENGTHS)[None])
    assert layout.mask is layout.mask
    assert layout.cu_seqlens is layout.cu_seqlens
    assert pack_layout(None) is None


def test_layout_and_call_must_agree_on_causality():
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="causal"):
        attention(q, k, v, causal=False, layout=pack_layout(torch.ones(1, 4, dtype=torch.long), causal=True))


def _tiny_lm(**overrides) -> LlamaLM:
    torch.manual_seed(0)
    cfg = LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, **overrides)
    return LlamaLM(cfg, vocab_size=96).eval()


def test_packed_llama_logits_equal_each_sample_alone():
    model = _tiny_lm()
    pad = 4
    embeds = torch.randn(1, sum(LENGTHS) + pad, 64)
    with torch.no_grad():
        packed = model(embeds, _positions(LENGTHS, pad)[None], _segments(LENGTHS, pad)[None])
        start, diffs = 0, []
        for n in LENGTHS:
            alone = model(embeds[:, start : start + n], torch.arange(n)[None])
            diffs.append((packed[:, start : start + n] - alone).abs().max().item())
            start += n
    print(f"packed vs alone, max abs logit diff per sample: {diffs}")
    assert max(diffs) <= 1e-5


def test_llama_forward_shares_one_layout_across_layers(monkeypatch):
    from mmscale.models import llama

    seen = []

    def recording_attention(q, k, v, causal, layout=None, kernel="auto"):
        seen.append(layout)
        return attention(q, k, v, causal, layout, kernel)

    monkeypatch.setattr(llama, "attention", recording_attention)
    model = _tiny_lm()
    with torch.no_grad():
        model(torch.randn(1, sum(LENGTHS), 64), _positions(LENGTHS)[None], _segments(LENGTHS)[None])
    assert len(seen) == model.cfg.num_layers
    assert all(isinstance(layout, PackedLayout) and layout is seen[0] for layout in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flash2", "flash4", "torch_varlen", "flex", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_match_sdpa_in_bf16(kernel, causal):
    """Each kernel `model.attention` can name, on CUDA in bf16, packed rows and single rows, output
    and gradients, against fp32 SDPA; and `auto` takes one of them."""
    why = attn.unavailable(kernel, "cuda", torch.bfloat16, [DIM])
    if why:
        pytest.skip(why)
    rows = torch.stack([_segments(LENGTHS, pad=4), _segments((8, 13))]).cuda()
    q, k, v = (t.requires_grad_() for t in _qkv(rows.shape[1], batch=2, dtype=torch.bfloat16, device="cuda"))
    for layout in (pack_layout(rows, causal), None):
        out = attention(q, k, v, causal, layout, kernel=kernel)
        reference = sdpa_attention(*(t.float() for t in (q, k, v)), causal, layout)
        weights = _weights(reference).cuda()
        ours = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
        theirs = torch.autograd.grad((reference * weights).sum(), (q, k, v))
        diffs = [(out.float() - reference).abs().max().item()]
        diffs += [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, theirs)]
        print(f"{kernel} vs fp32 SDPA (packed={layout is not None}, causal={causal}): out, dq, dk, dv {diffs}")
        assert max(diffs) <= 2e-2
    assert attn.pick("auto", q, packed=True) in ("flash2", "flash4", "torch_varlen")


def _math_masked_attention(q, k, v, mask):
    """What masked_attention ran before it repeated the kv heads: SDPA's enable_gqa, math kernel."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_masked_attention_equals_the_grouped_math_kernel_with_its_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(6, batch=2, kv_seq=9))
    mask = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[0, 0, 2] = False  # a query that may see no key
    outs, grads = [], []
    for fn in (masked_attention, _math_masked_attention):
        out = fn(q, k, v, mask)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    assert not outs[0].isnan().any() and torch.equal(outs[0][0, :, 2], torch.zeros(HEADS, DIM))


def test_cross_attention_rows_without_images_give_zeros_not_nan(monkeypatch):
    from mmscale.models import cross_attention_vlm as cross

    # Row 0: text, an image (3 of 4 tiles), text seeing it; row 1: text only (its image slot is padding).
    tiles = torch.zeros(2, 7, 1, 4, dtype=torch.long)
    tiles[0, 3:, 0, :3] = 1
    mask = cross.build_cross_attention_mask(tiles, torch.tensor([[True], [False]]), 5, None, torch.float32)
    torch.manual_seed(0)
    layer = cross.CrossAttention(LLMConfig(hidden_size=64, num_heads=4, num_kv_heads=2))
    x, vision = torch.randn(2, 7, 64), torch.randn(2, 20, 64)
    out = layer(x, vision, mask)
    monkeypatch.setattr(cross, "masked_attention", _math_masked_attention)
    torch.testing.assert_close(out, layer(x, vision, mask), rtol=0, atol=1e-6)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros(7, 64))
    assert out[0, :3].abs().sum() > 0  # tokens before the image attend to all of it (transformers' rule)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_cross_attention_runs_a_fused_kernel_on_cuda():
    # Llama 3.2 Vision's heads (32 query, 8 kv, dim 128) over two 2-tile images of 1,601 tokens.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 64, 128, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(2, 8, 4 * 1601, 128, generator=gen).cuda().bfloat16() for _ in range(2))
    mask = torch.ones(2, 1, 64, 4 * 1601, dtype=torch.bool, device="cuda")
    mask[:, :, :32, 2 * 1601 :] = False  # the first half of the text sees the first image only
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):  # without the math kernel: "No available kernel" unless a fused one takes it
        out = masked_attention(q, k, v, mask)
    reference = _math_masked_attention(q.float(), k.float(), v.float(), mask)
    diff = (out.float() - reference).abs().max().item()
    print(f"fused vs fp32 math kernel, grouped heads with a mask: {diff:.2e}")
    assert diff <= 2e-2
