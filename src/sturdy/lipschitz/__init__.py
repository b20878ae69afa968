"""Lipschitz-margin training and sound L2 certification.

Modules, one idea each: :mod:`.norms` (operator-norm algorithms: dense SVD, the FFT bound of
convolutions, power iteration), :mod:`.operators` (linear operators of layers), :mod:`.registry` (the
registry of per-operator rules: :func:`register_bound`, :func:`find_rule`), :mod:`.rules`,
:mod:`.rules_layers` and :mod:`.rules_copy` (the registered rules), :mod:`.graph` (``torch.fx`` tracing,
BatchNorm folding, composition), :mod:`.checks` (behaviour checks of the traced model), :mod:`.bounds`
(the public bound functions), :mod:`.tracker` (the training-time estimate), :mod:`.results` (result types
and the protocol the loss reads), :mod:`.losses`, :mod:`.certify`, :mod:`.tightness`. Formulas:
docs/design.md section 1.

* :func:`lipschitz_bound` / :func:`operator_norm`: guaranteed float64 upper bounds of a traced
  model's global L2 Lipschitz constant (per-operator rules from a registry, :func:`register_bound`).
* :class:`LipschitzTracker`: differentiable training-time estimate with persistent power iteration.
* :func:`lmt_loss`: the Lipschitz-margin training loss (pairwise or global form).
* :func:`certify`: certified radii; :func:`tightness`: how far they are from local and attack radii.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sturdy.lipschitz import certify
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> cert = certify(net, torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))
    >>> bool((cert.radius >= 0).all())
    True
"""

from sturdy.lipschitz.bounds import lipschitz_bound, operator_norm
from sturdy.lipschitz.certify import Certificate, certified_radius, certify
from sturdy.lipschitz.losses import CWarmup, lmt_logits, lmt_loss
from sturdy.lipschitz.norms import conv2d_fft_norm, guaranteed_norm, power_iteration
from sturdy.lipschitz.objective import LMTObjective, lmt_objective
from sturdy.lipschitz.operators import LinearOp
from sturdy.lipschitz.registry import Factor, OpCall, find_rule, register_bound
from sturdy.lipschitz.results import LayerBound, LipschitzBound, LipschitzEstimate, OperatorNorm
from sturdy.lipschitz.tightness import (
    AttackResult,
    Tightness,
    local_lipschitz,
    minimal_adversarial_radius,
    pgd_l2,
    tightness,
)
from sturdy.lipschitz.tracker import LipschitzTracker
from sturdy.utils import eval_mode

__all__ = [
    "LMTObjective",
    "lmt_objective",
    "register_bound",
    "find_rule",
    "OpCall",
    "Factor",
    "LinearOp",
    "lipschitz_bound",
    "operator_norm",
    "LipschitzBound",
    "LayerBound",
    "OperatorNorm",
    "LipschitzTracker",
    "LipschitzEstimate",
    "eval_mode",
    "guaranteed_norm",
    "power_iteration",
    "conv2d_fft_norm",
    "lmt_loss",
    "lmt_logits",
    "CWarmup",
    "certify",
    "certified_radius",
    "Certificate",
    "pgd_l2",
    "minimal_adversarial_radius",
    "local_lipschitz",
    "tightness",
    "Tightness",
    "AttackResult",
]
