"""Fourier-basis sensitivity heat maps and the Single Fourier Attack (docs/design.md section 2).

Images are ``(N, C, H, W)`` tensors in ``[0, 1]`` (any H, W); directions are the unit-L2 real Fourier
basis functions ``cos(2 pi (k p / H + l q / W) + phi)`` generated on the fly with ``torch.fft.irfft2``.
Analyses are keyword-only functions returning frozen dataclasses:

* :func:`fourier_heatmap` -> :class:`FourierHeatmap` (error / fooling rate per frequency);
* :func:`single_fourier_attack` -> :class:`UniversalPerturbation` (black-box universal perturbation);
* :func:`evaluate_perturbation` -> :class:`PerturbationReport` (held-out and shifted fooling rates);
* :func:`random_noise_baseline` -> :class:`RandomNoiseBaseline` (the chance level: Gaussian noise, same budget);
* :func:`fourier_combination_attack` -> :class:`FourierCombination` (beyond the paper: a few directions mixed);
* :func:`gradient_spectrum` -> :class:`GradientSpectrum` (one-backward predictor of the heat map).

Noise is added in pixel space: a model trained on normalised inputs is passed as
:func:`with_normalization` ``(model, mean, std)``. Heat maps take frequency subsets
(:func:`strided_frequencies`, :func:`band_frequencies`, or a list), split them over ``torchrun`` ranks
(``distributed=True``) and resume from partial results (``partial=path``). Every analysis chooses its
batch size online when none is given and can run the model under ``autocast`` / ``channels_last``
(:mod:`sturdy.fourier.batching`).

Every analysis evaluates an ``nn.Module`` in eval mode (:func:`sturdy.utils.eval_mode`) and restores its
training flags after. Figures (:mod:`sturdy.fourier.plots`) are ``matplotlib.figure.Figure`` objects.
"""

from sturdy.fourier.attack import SEARCHES, UniversalPerturbation, single_fourier_attack
from sturdy.fourier.basis import (
    DEFAULT_PHASE,
    canonical_index_map,
    fourier_basis,
    fourier_basis_batch,
    half_plane,
    is_self_conjugate,
    to_full_map,
)
from sturdy.fourier.batching import BatchSizer, ModelRunner
from sturdy.fourier.combine import FourierCombination, fourier_combination_attack, project_budget
from sturdy.fourier.evaluate import (
    PerturbationReport,
    RandomNoiseBaseline,
    evaluate_perturbation,
    random_noise_baseline,
)
from sturdy.fourier.frequencies import band_frequencies, canonical_rows, strided_frequencies
from sturdy.fourier.gradient import GradientSpectrum, gradient_spectrum, rank_correlation
from sturdy.fourier.heatmap import FourierHeatmap, fourier_heatmap, heatmap_draws
from sturdy.fourier.normalization import Normalized, with_normalization
from sturdy.fourier.perturbation import (
    NORMS,
    WAVES,
    AppliedPerturbation,
    apply_perturbation,
    fourier_perturbation,
    shape_directions,
    sign_patterns,
)
from sturdy.fourier.plots import plot_examples, plot_fourier_maps, plot_perturbation
from sturdy.fourier.search import Candidates, enumerate_candidates, halving_schedule
from sturdy.fourier.shift import circular_shift, random_shifts

__all__ = [
    "DEFAULT_PHASE",
    "NORMS",
    "WAVES",
    "fourier_basis",
    "fourier_basis_batch",
    "half_plane",
    "is_self_conjugate",
    "canonical_index_map",
    "to_full_map",
    "AppliedPerturbation",
    "apply_perturbation",
    "fourier_perturbation",
    "shape_directions",
    "sign_patterns",
    "FourierHeatmap",
    "fourier_heatmap",
    "heatmap_draws",
    "strided_frequencies",
    "band_frequencies",
    "canonical_rows",
    "with_normalization",
    "Normalized",
    "BatchSizer",
    "ModelRunner",
    "plot_fourier_maps",
    "plot_perturbation",
    "plot_examples",
    "SEARCHES",
    "Candidates",
    "UniversalPerturbation",
    "PerturbationReport",
    "enumerate_candidates",
    "halving_schedule",
    "single_fourier_attack",
    "evaluate_perturbation",
    "RandomNoiseBaseline",
    "random_noise_baseline",
    "FourierCombination",
    "fourier_combination_attack",
    "project_budget",
    "circular_shift",
    "random_shifts",
    "GradientSpectrum",
    "gradient_spectrum",
    "rank_correlation",
]
