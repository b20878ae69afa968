"""When the GGN diagonal is the Hessian diagonal: decided from the operators autograd traced.

The Hessian of the cross-entropy loss is ``J^T (diag p - p p^T) J + sum_c r_c d^2 f_c / dw^2`` with
``r = p - e_y``. Its diagonal equals the GGN's when every logit ``f_c`` has zero second derivative along
each single parameter ``w_i``, which holds (almost everywhere) when each ``f_c`` is piecewise linear in
each ``w_i`` on its own: every operator of the graph is piecewise linear in each input (ReLU, max-pool,
additions, reshapes, ...) or linear in each input separately (matrix products, convolutions, eval-mode
BatchNorm, products of tensors) with no parameter reaching two factors of one product.

:func:`analyse_graph` walks the autograd graph of the logits and answers ``is_hessian`` from that
sufficient condition, listing the operators that break it (GELU, tanh, LayerNorm, a weight that reaches
both factors of a product, an operator it does not know). It is conservative: ``True`` is a proof,
``False`` means "not proven" (an unknown operator that happens to be linear also gives ``False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

from torch import Tensor

__all__ = ["GraphExactness", "analyse_graph", "PIECEWISE_LINEAR", "MULTILINEAR"]

PIECEWISE_LINEAR = frozenset({
    "Relu", "Threshold", "LeakyRelu", "Hardtanh", "Relu6", "Clamp", "ClampMin", "ClampMax", "Abs", "Neg",
    "Add", "Sub", "Rsub", "Sum", "Mean", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Permute",
    "Transpose", "T", "Expand", "Squeeze", "Unsqueeze", "Clone", "Cat", "Stack", "Split", "SplitWithSizes",
    "Unbind", "Slice", "Select", "Index", "IndexSelect", "Gather", "Narrow", "AsStrided", "Alias", "ToCopy",
    "Copy", "CopySlices", "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D", "ReflectionPad3D",
    "ReplicationPad1D", "ReplicationPad2D", "ReplicationPad3D", "MaxPool1DWithIndices", "MaxPool2DWithIndices",
    "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "Maximum", "Minimum", "Fmax", "Fmin", "Max", "Min", "Amax",
    "Amin", "Repeat", "Roll", "Flip", "Im2Col", "Col2Im", "Embedding", "PixelShuffle", "PixelUnshuffle",
    "MaskedFill", "Where", "Cumsum", "Tril", "Triu", "Diagonal", "Trace", "Unfold", "Identity",
    "UpsampleNearest1D", "UpsampleNearest2D", "UpsampleBilinear2D", "NativeDropout",
})
"""Operators piecewise linear in each of their differentiable inputs jointly (names without ``Backward<n>``)."""

MULTILINEAR = frozenset({
    "Mul", "Mm", "Addmm", "Bmm", "Baddbmm", "Addbmm", "Mv", "Addmv", "Dot", "Vdot", "Linear", "Matmul",
    "Convolution", "CudnnConvolution", "MkldnnConvolution", "ConvolutionOverrideable", "NativeBatchNorm",
    "NativeBatchNormLegitNoTraining", "CudnnBatchNorm", "MiopenBatchNorm", "Addcmul", "Prelu",
    "PreluKernel", "Div",
})
"""Operators linear in each differentiable input when the others are held fixed (products of factors);
``Div`` is linear in its numerator only (its denominator must not depend on a parameter). BatchNorm is
affine in its input in eval mode (the only mode the GGN diagonal accepts)."""

_SUFFIX = re.compile(r"Backward\d*$")


@dataclass(frozen=True)
class GraphExactness:
    """Whether the GGN diagonal of a graph is its Hessian diagonal.

    Attributes:
        is_hessian: every operator is piecewise linear in each single parameter (see the module docstring).
        reasons: sorted operator names (and shared-factor notes) that prevent the proof; empty when ``is_hessian``.
    """

    is_hessian: bool
    reasons: Tuple[str, ...]

    def merge(self, other: GraphExactness) -> GraphExactness:
        """The verdict over two graphs (e.g. two chunks of data)."""
        reasons = tuple(sorted(set(self.reasons) | set(other.reasons)))
        return GraphExactness(self.is_hessian and other.is_hessian, reasons)


def _name(node: object) -> str:
    return _SUFFIX.sub("", type(node).__name__)


def analyse_graph(output: Tensor) -> GraphExactness:
    """Walk the autograd graph of ``output`` (logits of a forward pass) and decide ``is_hessian``."""
    root = output.grad_fn
    if root is None:
        return GraphExactness(True, ())
    leaves: Dict[object, FrozenSet[int]] = {}
    reasons: Set[str] = set()
    stack: List[Tuple[object, bool]] = [(root, False)]
    while stack:  # iterative post-order: a node's inputs are resolved before the node
        node, expanded = stack.pop()
        if node in leaves:
            continue
        inputs = [n for n, _ in node.next_functions]  # type: ignore[attr-defined]
        if not expanded:
            stack.append((node, True))
            stack.extend((n, False) for n in inputs if n is not None and n not in leaves)
            continue
        name = _name(node)
        if name == "AccumulateGrad":
            leaves[node] = frozenset({id(node.variable)})  # type: ignore[attr-defined]
            continue
        child: List[Optional[FrozenSet[int]]] = [leaves.get(n) if n is not None else None for n in inputs]
        union = frozenset().union(*(c for c in child if c))
        leaves[node] = union
        if not union or name in PIECEWISE_LINEAR:
            continue
        if name in MULTILINEAR:
            if name == "Div" and len(child) > 1 and child[1]:
                reasons.add("Div (a parameter in the denominator)")
                continue
            factors = [c for c in child if c]
            seen: Set[int] = set()
            for factor in factors:
                if seen & factor:
                    reasons.add(f"{name} (one parameter reaches two factors)")
                    break
                seen |= factor
            continue
        reasons.add(name)
    return GraphExactness(not reasons, tuple(sorted(reasons)))
