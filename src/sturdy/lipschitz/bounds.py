"""The public bound functions: guaranteed L2 Lipschitz bounds of a model and of one operator.

:func:`lipschitz_bound` traces the model (:mod:`.graph`), bounds every linear operator in float64
(:func:`~sturdy.lipschitz.norms.guaranteed_norm`: dense SVD, the FFT bound of convolutions, Hoelder for
pooling, closed forms) and composes the bounds; the power-iteration estimates of the same operators are
composed beside them (``estimate <= true norm <= upper`` per operator gives a measured gap).
:func:`operator_norm` does the same for a single linear operator.

Conventions: L2 norms on flattened per-sample tensors; the bound holds for the model in eval mode
(BatchNorm running statistics, Dropout off; the model's own mode is restored afterwards);
``input_shape`` is the shape of one input batch including the batch dimension, e.g. ``(1, 1, 8, 8)``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.checks import check_op_finite
from sturdy.lipschitz.graph import build_program, compose
from sturdy.lipschitz.norms import DENSE_MAX_ENTRIES, guaranteed_norm, power_iteration
from sturdy.lipschitz.operators import LinearLayerOp
from sturdy.lipschitz.proof import model_fingerprint
from sturdy.lipschitz.results import LayerBound, LipschitzBound, OperatorNorm
from sturdy.utils import eval_mode
from sturdy.validation import check_model

__all__ = ["lipschitz_bound", "operator_norm"]


def lipschitz_bound(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    dense_max_entries: int = DENSE_MAX_ENTRIES,
    power_iterations: int = 50,
    seed: int = 0,
) -> LipschitzBound:
    """Guaranteed global L2 Lipschitz bound of ``model`` (in eval mode) on inputs of ``input_shape``.

    Each linear operator gets a float64 upper bound (:func:`sturdy.lipschitz.norms.guaranteed_norm`:
    dense SVD when its matrix has at most ``dense_max_entries`` entries, the FFT bound for
    convolutions, Hoelder for pooling otherwise) and a power-iteration estimate.

    Args:
        model: a ``torch.fx``-traceable model returning logits.
        input_shape: shape of one input batch, e.g. ``(1, 1, 8, 8)``.
        dense_max_entries: largest dense matrix given an exact SVD.
        power_iterations: iterations of the reported estimate.
        seed: seed of the power-iteration start vectors.

    Raises:
        UnsupportedModuleError: an operator has no registered rule (the message names it and its path).
        ConfigurationError: malformed ``input_shape``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> b = lipschitz_bound(net, input_shape=(1, 4))
        >>> b.estimate <= b.upper and b.upper_body <= b.upper / 1e-3
        True
    """
    check_model(model)
    with eval_mode(model):
        return _lipschitz_bound(model, input_shape, dense_max_entries, power_iterations, seed)


def _lipschitz_bound(
    model: nn.Module, input_shape: Sequence[int], dense_max_entries: int, power_iterations: int, seed: int
) -> LipschitzBound:
    program = build_program(model, input_shape)
    gen = torch.Generator().manual_seed(int(seed))
    upper_norms: Dict[str, float] = {}
    est_norms: Dict[str, float] = {}
    layers: List[LayerBound] = []
    with torch.no_grad():
        for s in program.steps:
            if s.kind == "op":
                assert s.op is not None
                upper, method = guaranteed_norm(s.op, dense_max_entries=dense_max_entries)
                if math.isnan(upper):
                    raise ConfigurationError(f"the norm bound of {s.path!r} is NaN: its weights or statistics are not "
                                             "finite")
                est = power_iteration(s.op, iterations=power_iterations, generator=gen)
                upper_norms[s.name], est_norms[s.name] = upper, min(est, upper)
                layers.append(LayerBound(s.path, s.op_kind, upper, est_norms[s.name], method))
            elif s.kind == "factor" and s.factor != 1.0:
                layers.append(LayerBound(s.path, s.op_kind, s.factor, s.factor, "constant"))
    up = compose(program, upper_norms, 1.0)
    est = compose(program, est_norms, 1.0)
    last = program.last_linear
    upper_body = estimate_body = None
    last_weight = None
    if last is not None:
        upper_body, estimate_body = up[last.inputs[0]], est[last.inputs[0]]
        assert isinstance(last.op, LinearLayerOp)
        last_weight = last.op.weight().detach().to(torch.float64).clone()
    out = up[program.output]
    if out is None:
        out, upper_body = 0.0, (0.0 if last is not None else None)
    return LipschitzBound(
        upper=float(out),
        upper_body=None if upper_body is None else float(upper_body),
        estimate=float(est[program.output] or 0.0),
        estimate_body=None if estimate_body is None else float(estimate_body),
        per_layer=tuple(layers),
        last_weight=last_weight,
        input_shape=program.input_shape,
        fingerprint=model_fingerprint(model, program.input_shape),
    )


def operator_norm(
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    dense_max_entries: int = DENSE_MAX_ENTRIES,
    power_iterations: int = 100,
    seed: int = 0,
) -> OperatorNorm:
    """Norm of one linear operator (``nn.Linear``, ``nn.Conv2d``, pooling, eval BatchNorm, or a
    ``conv -> BatchNorm`` ``nn.Sequential``, folded), bias ignored.

    Args:
        module: the operator.
        input_shape: shape of one input batch, e.g. ``(1, 3, 7, 9)``.

    Raises:
        ConfigurationError: ``module`` is not a single linear operator.

    Example:
        >>> from torch import nn
        >>> n = operator_norm(nn.AvgPool2d(2), input_shape=(1, 1, 4, 4))
        >>> round(n.upper, 6), n.method
        (0.5, 'dense-svd')
    """
    check_model(module)
    with eval_mode(module):
        program = build_program(module, input_shape)
    ops = [s for s in program.steps if s.kind == "op"]
    others = [s for s in program.steps if s.kind == "factor" and s.op_kind != "folded"]
    if len(ops) != 1 or others:
        raise ConfigurationError(
            f"operator_norm needs exactly one linear operator (optionally followed by BatchNorm), got "
            f"{len(ops)} operators and {len(others)} other layers in {type(module).__name__}; use lipschitz_bound"
        )
    op = ops[0].op
    assert op is not None
    check_op_finite(op, ops[0].path)
    upper, method = guaranteed_norm(op, dense_max_entries=dense_max_entries)
    est = power_iteration(op, iterations=power_iterations, generator=torch.Generator().manual_seed(int(seed)))
    return OperatorNorm(upper=upper, estimate=min(est, upper), method=method)
