"""TTT's four rotations folded into the model's leading convolutions (torch.fx).

A TTT step runs the model's part up to the layer (the split's prefix) on the 4B images
[x, rot90 x, rot180 x, rot270 x]. Up to the first operation that is not rotation-equivariant,
that work has structure: for a convolution with kernel W, conv(rot_k x, W) = rot_k conv(x, W_k)
with W_k = W rotated by -k * 90 degrees, exactly when the window grid is symmetric (square
input, equal stride/padding/dilation on both axes, no cut-off last window); element-wise
operations and pooling commute with rotation under the same grid condition.
`fold_rotations` rewrites a prefix graph x -> values(rotated copies of x) into x -> the same
values, where each value is held as

  "same"    one (B, ...) tensor v whose rotated copies are the value: cat_k rot_k(v). The input
            is one; so is anything element-wise or pooled from it (the model's normalisation
            runs on B images instead of 4B);
  "stacked" (B, 4C, H, W): rotation k's feature maps, un-rotated, as channel group k. A
            convolution on "same" stacks its four rotated kernels (one conv with 4x the output
            channels on B images instead of 4B); one on "stacked" is a grouped conv (groups x 4);

and turned back into the 4B batch (`unstack`) right before the first operation that is not on
the whitelist (flatten, linear, batch norm, anything reading the batch size, ...). Same FLOPs,
same values up to rounding (the conv's sums run in another order, ~1e-6): the gain on CPU is
that few-channel convolutions and max-pooling vectorise over 4x the channels (seed CNN: a TTT
step ~15 % faster; `benchmarks/engine_speed.py --set fold_rotations=false` compares). Where
two entries of a max-pool window are exactly equal, the pooling picks the first in its scan
order, which differs between a rotated map and the un-rotated one: the value is the same, the
gradient goes to the other entry (either is a valid subgradient; with integer kernels on binary
images a review measured conv weight gradients 51 % apart, with the seed CNN on zero, binary or
clipped images <= 3e-5 after Adam steps). No fold for a prefix with an operation that may
change a tensor in place (inplace=True, x.relu_(), h[i] = v, out=..., a module with hooks): a
view or alias of a folded value would be changed in the model but not in the fold.

Whitelist (exact module types; subclasses may change forward): nn.Conv2d (zeros padding,
square kernel), nn.MaxPool2d/AvgPool2d and F.max_pool2d/F.avg_pool2d (square, no ceil mode, no
indices), adaptive average/max pooling to 1x1, element-wise activations (modules and functions, not in place), +, -, *, / with a
number or a one-element parameter/buffer, or between two folded values.
"""

from __future__ import annotations

import inspect
import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from engines.hooks import has_forward_hooks

__all__ = ["Fold", "fold_rotations", "in_place", "rotated_copies", "unstack"]

_CL = torch.channels_last

_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.ReLU6, nn.Hardswish,
                        nn.Hardsigmoid, nn.Softplus, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish,
                          F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.softplus,
                          F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.abs,
                          torch.exp, torch.neg, operator.neg}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "abs", "exp", "neg"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
               torch.mul, torch.div}
_ARITHMETIC_METHODS = {"add", "sub", "mul", "div"}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                       operator.imatmul, operator.setitem}
_GLOBAL_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_AVG_POOL_FUNCTIONS = {F.avg_pool2d, torch._C._nn.avg_pool2d}


def _layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last if `t` is laid out so (also with one channel, where both layouts are
    contiguous and only the channel stride tells), else contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=_CL) and (
            not t.is_contiguous() or (t.shape[1] == 1 and t.stride(1) == 1 and t.numel() > 1)):
        return _CL
    return torch.contiguous_format


def rotated_copies(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (4B, C, H, W) = [x, rot90 x, rot180 x, rot270 x] (counter-clockwise)."""
    return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])


class _Unstack(torch.autograd.Function):
    """(B, 4C, H, W) channel group k -> rot_k(group k), as the 4B batch; the gradient goes back
    in the input's layout (autograd's own rot90/cat backward would leave a transposed layout
    that makes the convolutions and pooling before it several times slower)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        ctx.layout = _layout(v)
        groups = v.chunk(4, 1)
        return torch.cat([torch.rot90(g, k, dims=(-2, -1)) for k, g in enumerate(groups)]
                         ).to(memory_format=ctx.layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        parts = grad.chunk(4, 0)
        return torch.cat([torch.rot90(g, -k, dims=(-2, -1)) for k, g in enumerate(parts)], 1
                         ).to(memory_format=ctx.layout)


def unstack(v: torch.Tensor) -> torch.Tensor:
    """A "stacked" (B, 4C, H, W) value as the 4B batch it stands for."""
    return _Unstack.apply(v)


def _rotated_kernels(w: torch.Tensor) -> torch.Tensor:
    """(O, I, k, k) -> (4O, I, k, k): block r is w rotated by -r * 90 degrees."""
    return torch.cat([torch.rot90(w, -r, dims=(-2, -1)) for r in range(4)]
                     ).to(memory_format=_layout(w))  # `contiguous` keeps C=1 strides


def conv_same(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int,
              padding: int, dilation: int) -> torch.Tensor:
    """conv2d of each rotated copy of x, stacked: one conv on B images, 4x the kernels."""
    return F.conv2d(x, _rotated_kernels(w), None if b is None else b.repeat(4), stride, padding,
                    dilation)


def conv_stacked(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int,
                 padding: int, dilation: int, groups: int) -> torch.Tensor:
    """conv2d of each channel group of a stacked value with its rotated kernels."""
    return F.conv2d(v, _rotated_kernels(w), None if b is None else b.repeat(4), stride, padding,
                    dilation, 4 * groups)


def to_stacked(v: torch.Tensor) -> torch.Tensor:
    """A "same" value as a "stacked" one (each group the same maps)."""
    return v.repeat(1, 4, 1, 1)


def _square(value) -> int | None:
    """An int, or a pair of equal ints, as one int; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1] \
            and isinstance(value[0], int):
        return value[0]
    return None


def _aligned(size: int, kernel: int, stride: int, padding: int, dilation: int) -> bool:
    """The windows along an axis of `size` are symmetric: the last one ends at the far edge of
    the padding as the first starts at the near one (nothing is cut off)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) % stride == 0


def _global_pool(node: fx.Node, mod: nn.Module | None) -> bool:
    """Adaptive average/max pooling to 1x1 (without indices)."""
    if mod is not None:
        return (type(mod) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
                and _square(mod.output_size) == 1 and not getattr(mod, "return_indices", False))
    if node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        extra = set(node.kwargs) - {"output_size", "return_indices"}
        indices = node.kwargs.get("return_indices", node.args[2] if len(node.args) > 2 else False)
        return len(node.args) <= 3 and not extra and not indices and _square(size) == 1
    return False


def _pool_args(node: fx.Node, mod: nn.Module | None) -> tuple | None:
    """(kernel, stride, padding, dilation) of a square 2-D max/avg pooling without ceil mode or
    indices, or None."""
    if mod is not None:
        if type(mod) is nn.MaxPool2d:
            if mod.ceil_mode or mod.return_indices:
                return None
            k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
        elif type(mod) is nn.AvgPool2d:
            if mod.ceil_mode:
                return None
            k, s, p, d = mod.kernel_size, mod.stride, mod.padding, 1
        else:
            return None
    else:
        args = list(node.args[1:])
        if node.target in _MAX_POOL_FUNCTIONS:
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode",
                     "return_indices"]
            defaults = [None, None, 0, 1, False, False]
        elif node.target in _AVG_POOL_FUNCTIONS:
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override"]
            defaults = [None, None, 0, False, True, None]
        else:
            return None
        if len(args) > len(names) or set(node.kwargs) - set(names):
            return None
        bound = dict(zip(names, defaults)) | dict(zip(names, args)) | dict(node.kwargs)
        if any(isinstance(v, fx.Node) for v in bound.values()) or bound["ceil_mode"] \
                or bound.get("return_indices"):
            return None
        k, s, p = bound["kernel_size"], bound["stride"], bound["padding"]
        d = bound.get("dilation", 1)
    s = k if s is None or s == [] or s == () else s
    k, s, p, d = _square(k), _square(s), _square(p), _square(d)
    return None if None in (k, s, p, d) else (k, s, p, d)


class Fold(NamedTuple):
    graph: fx.Graph      # x -> the prefix's outputs for rotated_copies(x)
    folded: int          # operations that run folded
    unstacked: int       # elements per image of the stacked values turned back into 4B
    modules: frozenset   # modules the fold reads the attributes of (their changes matter)


def fold_rotations(graph: fx.Graph, root: nn.Module) -> Fold:
    """`graph` (one placeholder x; nodes annotated by torch.fx's ShapeProp run on
    `rotated_copies(x)`) -> the `Fold` computing the same outputs from x itself. `root` owns
    the graph's modules and attributes."""
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1 or any(in_place(n, root) for n in nodes):
        return Fold(graph, 0, 0, frozenset())
    # every module's attributes decide what folds, or whether an op is in place: keyed
    modules = {n.target for n in nodes if n.op == "call_module"}
    out = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kind: dict[fx.Node, str] = {}           # folded values: "same" or "stacked"
    plain: dict[fx.Node, fx.Node] = {}      # folded value -> its 4B batch, made once
    folded = unstacked = 0

    def batch(n: fx.Node) -> fx.Node:
        nonlocal unstacked
        if n not in kind:
            return env[n]
        if n not in plain:
            fn = rotated_copies if kind[n] == "same" else unstack
            plain[n] = out.call_function(fn, (env[n],))
            if fn is unstack:
                unstacked += _per_image(n)
        return plain[n]

    for n in nodes:
        if n.op == "placeholder":
            env[n] = out.node_copy(n)
            kind[n] = "same"
            continue
        if n.op == "output":
            out.output(fx.node.map_arg(n.args[0], batch))
            continue
        inputs = [a for a in n.all_input_nodes if a in kind]
        rule = _rule(n, root, kind) if inputs else None
        if rule is None:
            env[n] = out.node_copy(n, batch)
            continue
        folded += 1
        how, result = rule
        if how == "copy":                    # the same op runs on the folded value
            env[n] = out.node_copy(n, lambda a: env[a])
        elif how == "arith":                 # two folded values: "same" joins "stacked"
            def arg(a):
                if isinstance(a, fx.Node) and kind.get(a) == "same" and result == "stacked":
                    return out.call_function(to_stacked, (env[a],))
                return env[a] if isinstance(a, fx.Node) else a
            env[n] = out.create_node(n.op, n.target, tuple(arg(a) for a in n.args), {}, n.name)
        else:                                # a convolution module
            mod = root.get_submodule(n.target)
            w = out.get_attr(f"{n.target}.weight")
            b = out.get_attr(f"{n.target}.bias") if mod.bias is not None else None
            s, p, d = _square(mod.stride), _square(mod.padding), _square(mod.dilation)
            src = env[n.args[0]]
            if kind[n.args[0]] == "same":
                env[n] = out.call_function(conv_same, (src, w, b, s, p, d))
            else:
                env[n] = out.call_function(conv_stacked, (src, w, b, s, p, d, mod.groups))
        kind[n] = result
    out.lint()
    return Fold(out, folded, unstacked, frozenset(modules))


def _inplace_flag(n: fx.Node) -> bool:
    """F.relu(x, True), F.dropout(x, 0.5, False, True): a function's `inplace` parameter given
    positionally (other positional flags, e.g. torch.sum's keepdim, are not)."""
    try:
        names = list(inspect.signature(n.target).parameters)
    except (TypeError, ValueError):  # builtins without a Python signature
        return False
    i = names.index("inplace") if "inplace" in names else -1
    return 0 <= i < len(n.args) and bool(n.args[i])


def in_place(n: fx.Node, root: nn.Module) -> bool:
    """Whether n may change one of its inputs (inplace=True, x.relu_(), h += 1, h[i] = v,
    out=..., a module with hooks, which may change what they are given)."""
    if n.op == "call_module":
        mod = root.get_submodule(n.target)
        return has_forward_hooks(mod) or bool(getattr(mod, "inplace", False))
    if n.kwargs.get("inplace") or "out" in n.kwargs:
        return True
    if n.op == "call_function":
        schema = getattr(n.target, "_schema", None)      # torch.ops.aten.relu_.default
        name = getattr(n.target, "__name__", "").split(".")[0]
        return (n.target in _IN_PLACE_OPERATORS or _inplace_flag(n)
                or (schema is not None and schema.is_mutable)
                or (name.endswith("_") and not name.endswith("__")))
    return n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__")


def _shape(n: fx.Node) -> torch.Size | None:
    """The shape of n's (4B) value when the graph was annotated (ShapeProp)."""
    return getattr(n.meta.get("tensor_meta"), "shape", None)


def _spatial(n: fx.Node) -> int | None:
    """n's square spatial size, or None."""
    shape = _shape(n)
    return int(shape[-1]) if shape is not None and len(shape) == 4 and \
        shape[-1] == shape[-2] else None


def _channels(n: fx.Node) -> int | None:
    shape = _shape(n)
    return int(shape[1]) if shape is not None and len(shape) == 4 else None


def _per_image(n: fx.Node) -> int:
    shape = _shape(n)
    return int(torch.Size(shape[1:]).numel()) if shape else 0


def _scalar_operand(a, root: nn.Module, kind: dict) -> bool:
    """A number, or a one-element parameter/buffer: the same for every rotation."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if isinstance(a, fx.Node) and a.op == "get_attr" and a not in kind:
        try:
            t = _attr(root, a)
        except AttributeError:
            return False
        return isinstance(t, torch.Tensor) and t.numel() == 1
    return False


def _attr(root: nn.Module, node: fx.Node):
    obj = root
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _rule(n: fx.Node, root: nn.Module, kind: dict) -> tuple[str, str] | None:
    """How node n runs on folded inputs ("copy" / "arith" / "conv", the result's kind), or None
    when it needs the 4B batch."""
    mod = root.get_submodule(n.target) if n.op == "call_module" else None
    first = n.args[0] if n.args else None
    only_first = (isinstance(first, fx.Node) and first in kind
                  and [a for a in n.all_input_nodes if a in kind] == [first]
                  and all(a is first or a.op == "get_attr" and a not in kind
                          for a in n.all_input_nodes))
    # element-wise: one folded tensor and otherwise constants
    if only_first and len(n.all_input_nodes) == 1:
        if mod is not None and type(mod) in _ELEMENTWISE_MODULES \
                and len(n.args) == 1 and not n.kwargs:
            return "copy", kind[first]
        if n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS:
            return "copy", kind[first]
        if n.op == "call_method" and n.target in _ELEMENTWISE_METHODS and len(n.args) == 1 \
                and not n.kwargs:
            return "copy", kind[first]
    # arithmetic with a number / one-element tensor, or between two folded values
    if (n.op == "call_function" and n.target in _ARITHMETIC
            or n.op == "call_method" and n.target in _ARITHMETIC_METHODS) \
            and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        folded = [x for x in (a, b) if isinstance(x, fx.Node) and x in kind]
        others = [x for x in (a, b) if not (isinstance(x, fx.Node) and x in kind)]
        if not all(_scalar_operand(x, root, kind) for x in others):
            return None
        kinds = [kind[x] for x in folded]
        if len(folded) == 2 and kinds != ["same", "same"]:
            # stacked groups line up only with stacked (or repeated "same") values of as many
            # channels; a one-channel "same" value broadcasts over every group as it is
            ca, cb = (_channels(x) for x in folded)
            if ca is None or cb is None:
                return None
            if kinds == ["stacked", "stacked"] and ca != cb:
                return None
            if "same" in kinds:
                same_c, stacked_c = (ca, cb) if kinds[0] == "same" else (cb, ca)
                if same_c not in (1, stacked_c):
                    return None
                return ("arith" if same_c == stacked_c else "copy"), "stacked"
        return "arith", "stacked" if "stacked" in kinds else "same"
    # global pooling to 1x1: the same set of values in any rotation
    if only_first and _global_pool(n, mod):
        return "copy", kind[first]
    # square 2-D pooling with a symmetric window grid: per channel, so on either kind as is
    if only_first and (mod is not None or n.op == "call_function"):
        pool = _pool_args(n, mod)
        size = _spatial(first)
        if pool is not None and size is not None and _aligned(size, *pool):
            return "copy", kind[first]
    # a plain 2-D convolution with a symmetric grid
    if mod is not None and type(mod) is nn.Conv2d and only_first and len(n.args) == 1 \
            and not n.kwargs and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        k = _square(mod.kernel_size)
        s, p, d = _square(mod.stride), _square(mod.padding), _square(mod.dilation)
        size = _spatial(first)
        if None in (k, s, p, d, size) or not _aligned(size, k, s, p, d):
            return None
        if kind[first] == "same" and mod.groups != 1:
            return None
        return "conv", "stacked"
    return None
