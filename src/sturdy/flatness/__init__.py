"""Normalized flatness: GGN and Hessian diagonals, normalized sharpness, baselines, correlations, robustness.

Scale-invariant flatness after Tsuzuku, Sato and Sugiyama (ICML 2020), with the generalisation
measures and rank-correlation protocol of Jiang et al. (ICLR 2020). Conventions: the training loss
is the mean cross-entropy over the given data; models are evaluated in eval mode and never modified;
device and dtype follow the model's parameters; solvers and references run in float64.
"""

from sturdy.flatness.correlation import MeasureCorrelation, correlate_measures, granulated_tau, kendall_tau
from sturdy.flatness.curvature import (
    EigenEstimate,
    HessianDiagonal,
    TraceEstimate,
    hessian_diagonal,
    hutchinson_trace,
    top_hessian_eigenvalue,
)
from sturdy.flatness.invariance import InvarianceRow, RescalingInvariance, check_rescaling_invariance
from sturdy.flatness.measures import compute_measures
from sturdy.flatness.normalized import (
    LayerSharpness,
    NormalizedSharpness,
    aggregate_layer,
    normalized_sharpness,
    solve_layer,
)
from sturdy.flatness.norms import log_frobenius_product, log_spectral_product
from sturdy.flatness.perturbation import adaptive_average_sharpness, pacbayes_flatness
from sturdy.flatness.registry import Measure, MeasureSet, MeasureSpec, available_measures, register_measure
from sturdy.flatness.rescale import rescale_nodes
from sturdy.flatness.robustness import SignErrors, TauDifference, sign_errors, tau_difference
from sturdy.flatness.sketching import DiagonalSketch, TraceSketch, hutchpp_diagonal, hutchpp_trace
from sturdy.flatness.spectrum import Eigenvalues, SpectralDensity, hessian_eigenvalues, spectral_density
from sturdy.flatness.symmetry import (
    AttentionBlock,
    BalancedSharpness,
    balance_attention,
    balanced_normalized_sharpness,
    linear_heads,
    register_attention,
    transform_attention,
)

__all__ = [
    "HessianDiagonal",
    "TraceEstimate",
    "EigenEstimate",
    "hessian_diagonal",
    "hutchinson_trace",
    "top_hessian_eigenvalue",
    "TraceSketch",
    "DiagonalSketch",
    "hutchpp_trace",
    "hutchpp_diagonal",
    "Eigenvalues",
    "SpectralDensity",
    "hessian_eigenvalues",
    "spectral_density",
    "LayerSharpness",
    "NormalizedSharpness",
    "aggregate_layer",
    "solve_layer",
    "normalized_sharpness",
    "rescale_nodes",
    "check_rescaling_invariance",
    "RescalingInvariance",
    "InvarianceRow",
    "Measure",
    "MeasureSet",
    "MeasureSpec",
    "register_measure",
    "available_measures",
    "compute_measures",
    "log_spectral_product",
    "log_frobenius_product",
    "pacbayes_flatness",
    "adaptive_average_sharpness",
    "kendall_tau",
    "granulated_tau",
    "MeasureCorrelation",
    "correlate_measures",
    "SignErrors",
    "sign_errors",
    "TauDifference",
    "tau_difference",
    "BalancedSharpness",
    "balanced_normalized_sharpness",
    "balance_attention",
    "transform_attention",
    "register_attention",
    "linear_heads",
    "AttentionBlock",
]
