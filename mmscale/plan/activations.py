"""Activation memory of one training micro-batch, measured by running the real model without data.

The model is built on the meta device (shapes and dtypes, no memory, no arithmetic) and runs
forward and backward on the planned batch. Its floating-point tensors stay on meta; its
integer and boolean tensors (token ids, labels, masks, packing layouts) are small and real,
because the model's control flow reads them: how many image slots a row has, which positions
are labelled, where packed samples start. An operation that mixes the two runs on meta with
the real inputs copied there; a boolean index into a meta tensor is first turned into real
positions, so the result's shape is known. A dispatch mode adds up the bytes of every tensor
an operation creates while that tensor lives; its peak is what the step needs beyond the
model states: saved activations, logits and loss, attention's and the backward's temporaries.

Why not PyTorch's own tools: FakeTensorMode stops at the first data-dependent shape (the
image slot count, the labelled positions), and torch.distributed._tools.MemTracker hooks
every parameter's gradient, which a model with frozen parts does not have.

Gradients of parameters are dropped as soon as they are complete, as ZeRO does once it has
copied them into its reduce bucket (the plan counts buckets and gradient partitions itself).
"""

from __future__ import annotations

import weakref
from unittest import mock

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

META = torch.device("meta")


def _is_meta(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta


def _to_meta(x: object) -> object:
    return x.to(META) if isinstance(x, torch.Tensor) and not x.is_meta else x


def _real_positions(index: torch.Tensor | None) -> tuple:
    """A real boolean index becomes its real integer positions, one per dimension it spans."""
    if isinstance(index, torch.Tensor) and not index.is_meta and index.dtype == torch.bool:
        return index.nonzero(as_tuple=True)
    return (index,)


class LiveBytes(TorchDispatchMode):
    """Runs each operation (on meta where any input is), and tracks the bytes of the storages
    its outputs create while they live, and their peak."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_is_meta(x) for x in tree_leaves((args, kwargs))):
            if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
                indices = [p for index in args[1] for p in _real_positions(index)]
                args = (args[0], indices, *args[2:])
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        out = func(*args, **kwargs)
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: it shares its input's storage
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        self.peak = max(self.peak, self.current)
        return out

    def hold(self, tensors) -> None:
        """Count tensors made before the tracker started (e.g. under deepspeed.zero.Init, whose
        constructor wrappers do not run inside a dispatch mode)."""
        for tensor in tensors:
            self._track(tensor)
        self.peak = max(self.peak, self.current)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.current += size
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.current -= size


def _fused_sdpa(sdpa):
    """SDPA that runs meta tensors as a fused kernel does: saving the output and its log-sum-exp,
    never the (seq x seq) scores.

    On meta, SDPA falls back to its math path, which materialises the scores; the kernels
    that actually run do not: on CUDA flash-attn or SDPA's flash / memory-efficient kernels,
    on CPU SDPA's own flash kernel (torch._fused_sdp_choice picks it for every mask and head
    layout). The one case CUDA serves with the math kernel keeps it. Its CPU form stands in for all of them: grouped K/V heads
    as they are (flash kernels read them natively), a boolean mask made additive as SDPA makes it.
    """

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # A mask with grouped heads: CUDA's flash kernel takes no mask and its memory-efficient one
        # no enable_gqa (torch 2.13), so the math kernel runs there, scores and all.
        if not q.is_meta or (attn_mask is not None and enable_gqa):
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=META).masked_fill(~mask.to(META), float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale
        )
        return out

    return fused


def _drop_grad(param: nn.Parameter) -> None:
    param.grad = None


def step_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Peak bytes of one forward + backward of `model` (built on the meta device, frozen parts
    already frozen) on the real `batch`, beyond the weights."""
    model = model.to(dtype).train()
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_drop_grad)
    # Images come in the training dtype, on meta: the vision tower's input is real data.
    batch = {k: v.to(META, dtype) if v.is_floating_point() else v for k, v in batch.items()}
    tracker = LiveBytes()
    # Patched on the module, not with a TorchFunctionMode: that mode is thread-local, and the
    # backward's recomputation of checkpointed blocks runs on autograd's meta-device thread.
    with tracker, mock.patch.object(F, "scaled_dot_product_attention", _fused_sdpa(F.scaled_dot_product_attention)):
        model(**batch).backward()
    return tracker.peak
