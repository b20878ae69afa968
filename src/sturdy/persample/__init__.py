"""Per-sample squared gradients: ``sum_x g_x^2`` of every parameter from one output gradient.

The shared engine of the parts that need second moments of per-sample gradients: the compression
statistics (``sum_x g_x^2`` of the training loss, during the backward pass) and the exact GGN diagonal
of the flatness part (the same sum for each column of the softmax Hessian's factor). Like BackPACK's
``SumGradSquared``/``DiagGGNExact`` they share one set of module derivatives; like Opacus, one file
per layer type:

* :mod:`~sturdy.persample.registry`: ``@register_squared_grad(nn.X)`` rules and :func:`rule_for`, and
  the column rules (``K`` output gradients of one input at once) with :func:`column_rule_for`;
* :mod:`~sturdy.persample.linear`, :mod:`~sturdy.persample.conv`, :mod:`~sturdy.persample.batchnorm`,
  :mod:`~sturdy.persample.embedding`: the registered rules (Linear, Conv1d and Conv2d with any groups,
  dilation, stride and padding, BatchNorm, Embedding), each with its column rule;
* :mod:`~sturdy.persample.generic`: ``torch.func`` per-sample gradients for every other module (and,
  given dotted names, for a whole network);
* :mod:`~sturdy.persample.chunking`: memory budgets and the chunked batched products;
* :mod:`~sturdy.persample.recorder`: the module hooks that feed the rules;
* :mod:`~sturdy.persample.reference`: the per-sample loop the rules are tested against.

Convention: for a scalar ``L`` backpropagated from the output gradients ``delta`` a rule receives,
the result is ``sum_x (dL/dtheta restricted to sample x)^2`` elementwise; for the mean of a batch's
losses that is ``(1/b^2) sum_x g_x^2``, with ``g_x`` the gradient of sample ``x``'s own loss.
"""

from sturdy.persample import batchnorm as _batchnorm  # noqa: F401  (registers its rule)
from sturdy.persample import conv as _conv  # noqa: F401  (registers its rule)
from sturdy.persample import embedding as _embedding  # noqa: F401  (registers its rule)
from sturdy.persample import linear as _linear  # noqa: F401  (registers its rule)
from sturdy.persample.batchnorm import uses_batch_statistics
from sturdy.persample.chunking import samples_per_chunk
from sturdy.persample.generic import func_squared_gradients, generic_rule
from sturdy.persample.recorder import (
    CallRecorder,
    SquaredGradientHooks,
    TrackedModule,
    column_squared_gradients,
    squared_gradients,
    trainable_modules,
)
from sturdy.persample.reference import per_sample_squared_gradients
from sturdy.persample.registry import (
    SquaredGradRule,
    column_rule_for,
    register_column_rule,
    register_squared_grad,
    rule_for,
    squared_grad_rules,
)

__all__ = [
    "SquaredGradRule",
    "register_squared_grad",
    "squared_grad_rules",
    "rule_for",
    "register_column_rule",
    "column_rule_for",
    "column_squared_gradients",
    "generic_rule",
    "func_squared_gradients",
    "samples_per_chunk",
    "uses_batch_statistics",
    "TrackedModule",
    "trainable_modules",
    "squared_gradients",
    "SquaredGradientHooks",
    "CallRecorder",
    "per_sample_squared_gradients",
]
