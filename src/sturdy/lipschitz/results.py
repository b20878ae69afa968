"""Results of the Lipschitz analyses and the protocol the training loss reads.

* :class:`LipschitzBound` (with one :class:`LayerBound` per operator): guaranteed bounds of a model,
  from :func:`~sturdy.lipschitz.lipschitz_bound`;
* :class:`OperatorNorm`: bounds of one linear operator, from :func:`~sturdy.lipschitz.operator_norm`;
* :class:`LipschitzEstimate`: the differentiable training-time estimate of
  :class:`~sturdy.lipschitz.LipschitzTracker` (power iteration, never a certificate).

A guaranteed bound and an estimate both satisfy :class:`SupportsLipschitz` (``lipschitz``, ``body``,
``last_weight``), which is all the LMT loss needs, so either can be passed to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

__all__ = ["SupportsLipschitz", "LayerBound", "LipschitzBound", "OperatorNorm", "LipschitzEstimate"]

Number = Union[float, torch.Tensor]


@runtime_checkable
class SupportsLipschitz(Protocol):
    """What the Lipschitz-margin loss reads from a bound or an estimate.

    Attributes:
        lipschitz: bound (or estimate) of the L2 Lipschitz constant ``L`` of the map input -> logits.
        body: same for ``L_body``, the map input -> input of the last linear layer (``None`` when the
            logits are not produced by a linear layer).
        last_weight: weight matrix ``(classes, features)`` of that last linear layer (or ``None``).
    """

    @property
    def lipschitz(self) -> Number: ...

    @property
    def body(self) -> Optional[Number]: ...

    @property
    def last_weight(self) -> Optional[torch.Tensor]: ...


@dataclass(frozen=True)
class LayerBound:
    """Bound of one operator: ``estimate <= true norm <= upper``.

    Attributes:
        path: module path in the model (or graph node name for functions).
        kind: ``"conv2d"``, ``"linear"``, ``"batchnorm"``, ``"avgpool"``, ``"activation"``, ``"maxpool"``, ...
        upper: guaranteed upper bound (float64, with safety factor) or the exact constant factor.
        estimate: power-iteration estimate (equal to ``upper`` for constants and closed forms).
        method: ``"dense-svd"``, ``"fft"``, ``"holder"``, ``"closed-form"`` or ``"constant"``.
    """

    path: str
    kind: str
    upper: float
    estimate: float
    method: str

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "upper": self.upper, "estimate": self.estimate,
                "method": self.method}


@dataclass(frozen=True)
class LipschitzBound:
    """Global L2 Lipschitz bounds of a model in eval mode.

    Attributes:
        upper: guaranteed upper bound ``L`` of the whole map input -> logits.
        upper_body: guaranteed bound ``L_body`` of the map input -> input of the last linear layer
            (``None`` when the output is not produced by a linear layer).
        estimate: the same composition with power-iteration estimates of the operator norms.
        estimate_body: same for the body.
        per_layer: one :class:`LayerBound` per operator with a non-trivial factor.
        last_weight: float64 weight matrix of the last linear layer (``None`` as for ``upper_body``).
        input_shape: the traced input shape (batch dimension 1).
        fingerprint: sha256 of the weights, buffers, module structure and input shape the bound was computed
            for; :func:`~sturdy.lipschitz.certify` refuses a bound whose fingerprint is not the model's.

    As a :class:`SupportsLipschitz`, ``lipschitz`` is ``upper`` and ``body`` is ``upper_body``.
    """

    upper: float
    upper_body: Optional[float]
    estimate: float
    estimate_body: Optional[float]
    per_layer: Tuple[LayerBound, ...]
    last_weight: Optional[torch.Tensor]
    input_shape: Tuple[int, ...]
    fingerprint: str = ""

    @property
    def lipschitz(self) -> float:
        """The guaranteed bound ``L`` (``upper``)."""
        return self.upper

    @property
    def body(self) -> Optional[float]:
        """The guaranteed bound ``L_body`` (``upper_body``)."""
        return self.upper_body

    def to_dict(self) -> Dict[str, Any]:
        return {
            "upper": self.upper,
            "upper_body": self.upper_body,
            "estimate": self.estimate,
            "estimate_body": self.estimate_body,
            "input_shape": list(self.input_shape),
            "fingerprint": self.fingerprint,
            "per_layer": [layer.to_dict() for layer in self.per_layer],
        }


@dataclass(frozen=True)
class OperatorNorm:
    """Norm of one linear operator: ``estimate <= ||A||_2 <= upper``; ``method`` as in :class:`LayerBound`."""

    upper: float
    estimate: float
    method: str

    def to_dict(self) -> Dict[str, Any]:
        return {"upper": self.upper, "estimate": self.estimate, "method": self.method}


@dataclass(frozen=True)
class LipschitzEstimate:
    """Differentiable training-time estimate (power iteration; NOT a guaranteed bound).

    Attributes:
        lipschitz: estimate of ``L`` (0-dim tensor, differentiable in the weights).
        body: estimate of ``L_body`` (or ``None``).
        last_weight: the live weight of the last linear layer (or ``None``).
    """

    lipschitz: torch.Tensor
    body: Optional[torch.Tensor]
    last_weight: Optional[torch.Tensor]

    def to_dict(self) -> Dict[str, Any]:
        """Current values as floats (no gradient)."""
        return {
            "lipschitz": None if self.lipschitz is None else float(self.lipschitz.detach()),
            "body": None if self.body is None else float(self.body.detach()),
        }
