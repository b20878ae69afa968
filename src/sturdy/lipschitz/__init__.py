"""Lipschitz-margin training and sound L2 certification.

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

from sturdy.lipschitz.bounds import Factor, LinearOp, OpCall, find_rule, register_bound
from sturdy.lipschitz.certify import Certificate, certified_radius, certify
from sturdy.lipschitz.losses import CWarmup, lmt_logits, lmt_loss
from sturdy.lipschitz.network import (
    LayerBound,
    LipschitzBound,
    LipschitzEstimate,
    LipschitzTracker,
    OperatorNorm,
    eval_mode,
    lipschitz_bound,
    operator_norm,
)
from sturdy.lipschitz.power import conv2d_fft_norm, guaranteed_norm, power_iteration
from sturdy.lipschitz.tightness import (
    AttackResult,
    Tightness,
    local_lipschitz,
    minimal_adversarial_radius,
    pgd_l2,
    tightness,
)

__all__ = [
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
