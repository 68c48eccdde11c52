"""Max-pooling for batched episodes, with the episode dim folded into the channels.

Under `vmap`, a convolution with per-episode weights runs as one grouped convolution whose
output holds the episodes beside the channels (N, G, C, H, W), channels_last when the weights
are. torch's own vmap rule for max-pooling moves the episode dim in front of the batch
instead: a copy into NCHW, where CPU max-pooling is 3-20x slower than channels_last (measured
on this repo's seed nets; benchmarks/episodes_speed.py). Pooling is per channel, so here the
episodes stay beside the channels: (N, G*C, H, W) is a view, pooled as G*C channels in its
own layout, the result viewed back. Same values (max-pooling is exact), same indices.

`channel_pooling()` is a TorchFunctionMode: inside it `F.max_pool2d` / `torch.max_pool2d` /
`nn.MaxPool2d` of a 4-D (or 3-D) input run an autograd.Function whose vmap rule does the
above, and whose backward is another with the same rule.
Other calls pass through. Used only inside `engines.batched`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["channel_pooling"]


def _pair(v: int | Sequence[int] | None, default: Sequence[int]) -> list[int]:
    if v is None or (isinstance(v, Sequence) and len(v) == 0):
        return list(default)
    if isinstance(v, int):
        return [v, v]
    return [int(t) for t in v] if len(v) == 2 else [int(v[0])] * 2


class _MaxPool2d(torch.autograd.Function):
    """(values, indices) of aten's max_pool2d_with_indices; under vmap the episodes are
    folded into the channels (`vmap`), the backward is `_MaxPool2dBackward`."""

    @staticmethod
    def forward(x, kernel, stride, padding, dilation, ceil_mode):
        return torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation,
                                                      ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding, dilation, ceil_mode = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad_out, _grad_idx):
        x, idx = ctx.saved_tensors
        grad = _MaxPool2dBackward.apply(grad_out, x, idx, *ctx.args)
        return grad, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, kernel, stride, padding, dilation, ceil_mode):
        flat, pos = _fold(x, in_dims[0], info.batch_size)
        out, idx = _MaxPool2d.apply(flat, kernel, stride, padding, dilation, ceil_mode)
        g = info.batch_size
        return (_unfold(out, pos, g), _unfold(idx, pos, g)), (pos, pos)


class _MaxPool2dBackward(torch.autograd.Function):
    """aten's max_pool2d_with_indices_backward, episodes folded into the channels under vmap
    (no double backward)."""

    @staticmethod
    def forward(grad, x, idx, kernel, stride, padding, dilation, ceil_mode):
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, padding,
                                                               dilation, ceil_mode, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("batched max-pooling has no double backward")

    @staticmethod
    def vmap(info, in_dims, grad, x, idx, kernel, stride, padding, dilation, ceil_mode):
        g = info.batch_size
        grad_f, pos = _fold(grad, in_dims[0], g)
        x_f, _ = _fold(x, in_dims[1], g)
        idx_f, _ = _fold(idx, in_dims[2], g)
        out = _MaxPool2dBackward.apply(grad_f, x_f, idx_f, kernel, stride, padding, dilation,
                                       ceil_mode)
        return _unfold(out, pos, g), pos


def _fold(t: torch.Tensor, dim: int | None, size: int) -> tuple[torch.Tensor, int]:
    """Physical `t` with its episode dim just before the channels, the two merged: (..., G*C,
    H, W), channels_last; returns it and the position of the merged dim."""
    if dim is None:
        t = t.unsqueeze(0).expand(size, *t.shape)
        dim = 0
    pos = t.dim() - 4
    flat = t.movedim(dim, pos).flatten(pos, pos + 1)
    if flat.dim() == 4:  # a copy unless it is one already (a first conv's output is NCHW)
        flat = flat.contiguous(memory_format=torch.channels_last)
    return flat, pos


def _unfold(t: torch.Tensor, pos: int, size: int) -> torch.Tensor:
    return t.unflatten(pos, (size, t.shape[pos] // size))


_POOLS = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d,
          torch._C._nn.max_pool2d_with_indices}


def _pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
          return_indices=False):
    kernel = _pair(kernel_size, ())
    out, idx = _MaxPool2d.apply(x, kernel, _pair(stride, kernel), _pair(padding, (0, 0)),
                                _pair(dilation, (1, 1)), bool(ceil_mode))
    return (out, idx) if return_indices else out


class channel_pooling(TorchFunctionMode):  # noqa: N801 (used as a context manager)
    """`with channel_pooling(): ...`: 2-D max-pooling through `ttt_pipe::max_pool2d`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _POOLS and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() in (3, 4):
            if func is torch._C._nn.max_pool2d_with_indices:
                kwargs = {**kwargs, "return_indices": True}
            return _pool(*args, **kwargs)
        return func(*args, **kwargs)
