"""Edges of the public Python API that the command line never sees: a model on the ``meta`` device, integer
and half-precision images, a NaN pixel, a model whose logits are NaN, and non-finite saved state.

One table: every public function of every part (the names of each part's ``__all__`` and the training core)
against each hostile input it can receive. The outcome is a valid result or one :class:`SturdyError`, never a
raw exception; where :mod:`sturdy.validation` states a rule (meta models, integer pixels and NaN values are
refused, floating-point images of any precision are accepted) the test holds the function to it. A public
name that takes no model and no images is listed in ``NOT_APPLICABLE`` with the reason, so a new public
function cannot be added without a row here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import nn

import sturdy.compression as compression
import sturdy.datasource as datasource
import sturdy.flatness as flatness
import sturdy.fourier as fourier
import sturdy.lipschitz as lipschitz
import sturdy.training as training
from sturdy.data import ImageDataset
from sturdy.errors import CheckpointError, ConfigurationError, DataError, SturdyError
from sturdy.training import TrainConfig

PARTS = {"lipschitz": lipschitz, "fourier": fourier, "flatness": flatness, "compression": compression,
         "training": training, "datasource": datasource}

X = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8) % 10
SHAPE = (1, 1, 8, 8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _nan_logits_model() -> nn.Module:
    """Finite weights whose products overflow: the hidden units are +inf, the logits inf - inf = NaN."""
    model = _model()
    with torch.no_grad():
        model[1].weight.fill_(3e38)
        model[3].weight[:, ::2] *= -1
    return model


def _nan_pixel(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


# The hostile inputs: (model, images) and the outcome the rules of sturdy.validation require.
REFUSED, ACCEPTED = "refused", "accepted"
CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]] = {
    "meta-model": (lambda: _model().to("meta"), lambda: X, REFUSED),
    "uint8-images": (_model, lambda: (X * 255).to(torch.uint8), REFUSED),
    "float16-images": (_model, lambda: X.half(), ACCEPTED),
    "nan-pixel": (_model, lambda: _nan_pixel(X), REFUSED),
    "nan-logits": (_nan_logits_model, lambda: X, REFUSED),
}
IMAGE_CASES = ("uint8-images", "float16-images", "nan-pixel")
# where a rule accepts what CASES refuses elsewhere: (function, case) -> why
ACCEPTED_HERE = {
    ("training.train", "uint8-images"): "an ImageDataset may hold uint8 pixels (sturdy.datasets' cache); the training "
                                        "core converts them to [0, 1] per batch",
    ("training.evaluate", "uint8-images"): "the same data contract as train",
}
MODEL_CASES = ("meta-model", "nan-logits")
ALL_CASES = (*MODEL_CASES, *IMAGE_CASES)


def _delta() -> torch.Tensor:
    return fourier.fourier_perturbation((1, 8, 8), 0, 1, eps=0.5)


def _dataset(x: torch.Tensor) -> ImageDataset:
    return ImageDataset(x, Y, 10, "toy", "test")


def _train(model: nn.Module, x: torch.Tensor) -> Any:
    return training.train(model, _dataset(x), config=TrainConfig(epochs=1, batch_size=8, device="cpu"),
                          progress=False)


def _certified_radius(model: nn.Module, x: torch.Tensor) -> Any:
    bound = lipschitz.lipschitz_bound(_model(), input_shape=SHAPE)
    with torch.no_grad():
        logits = model(x)
    return lipschitz.certified_radius(logits, bound=bound)


def _tracker(model: nn.Module, x: torch.Tensor) -> Any:
    return lipschitz.LipschitzTracker(model, input_shape=SHAPE, warmup_iterations=2)()


def _plot_examples(model: nn.Module, x: torch.Tensor) -> Any:
    import matplotlib.pyplot as plt

    fig = fourier.plot_examples(model, _delta(), x, n=2)
    plt.close(fig)
    return fig


# name -> (call(model, images), the cases that reach it). A function that runs no model takes the image cases
# only; one that takes no images, the model cases only.
TABLE: Dict[str, Tuple[Callable[[nn.Module, torch.Tensor], Any], Tuple[str, ...]]] = {
    # lipschitz
    "lipschitz.lipschitz_bound": (lambda m, x: lipschitz.lipschitz_bound(m, input_shape=SHAPE), ("meta-model",)),
    "lipschitz.operator_norm": (lambda m, x: lipschitz.operator_norm(m[1], input_shape=(1, 64)), ("meta-model",)),
    "lipschitz.LipschitzTracker": (_tracker, ("meta-model",)),
    "lipschitz.certify": (lambda m, x: lipschitz.certify(m, x, Y), ALL_CASES),
    # the data contract every analysis reads: the batches of a pass, checked, on the model's device
    "datasource.data_source": (lambda m, x: list(datasource.data_source(x, Y, batch_size=4).batches(
        device=torch.device("cpu"), dtype=torch.float32, model=m)), IMAGE_CASES),
    "lipschitz.certified_radius": (_certified_radius, ("nan-logits",)),
    "lipschitz.pgd_l2": (lambda m, x: lipschitz.pgd_l2(m, x, Y, eps=0.5, steps=2, restarts=1), ALL_CASES),
    "lipschitz.minimal_adversarial_radius": (
        lambda m, x: lipschitz.minimal_adversarial_radius(m, x, Y, steps=2, restarts=1, bisection_steps=2),
        ALL_CASES),
    "lipschitz.local_lipschitz": (  # in float64, where the nan-logits model does not overflow
        lambda m, x: lipschitz.local_lipschitz(m, x[:2]), ("meta-model", *IMAGE_CASES)),
    "lipschitz.tightness": (
        lambda m, x: lipschitz.tightness(m, x[:2], Y[:2], steps=2, restarts=1, bisection_steps=2), ALL_CASES),
    # fourier
    "fourier.fourier_heatmap": (
        lambda m, x: fourier.fourier_heatmap(m, x, Y, eps=1.0, frequencies=[(0, 1), (1, 1)]), ALL_CASES),
    "fourier.single_fourier_attack": (
        lambda m, x: fourier.single_fourier_attack(m, x, eps=1.0, max_queries=2000), ALL_CASES),
    "fourier.evaluate_perturbation": (
        lambda m, x: fourier.evaluate_perturbation(m, _delta(), x, Y, shifts=2), ALL_CASES),
    "fourier.random_noise_baseline": (
        lambda m, x: fourier.random_noise_baseline(m, x, Y, eps=1.0, draws=2), ALL_CASES),
    "fourier.fourier_combination_attack": (
        lambda m, x: fourier.fourier_combination_attack(m, x, eps=1.0, pool=2, rounds=1, scan_images=4,
                                                        initial_images=4), ALL_CASES),
    "fourier.gradient_spectrum": (lambda m, x: fourier.gradient_spectrum(m, x, Y), ALL_CASES),
    "fourier.plot_examples": (_plot_examples, ALL_CASES),
    "fourier.apply_perturbation": (lambda m, x: fourier.apply_perturbation(x, _delta()), IMAGE_CASES),
    # flatness
    "flatness.hessian_diagonal": (lambda m, x: flatness.hessian_diagonal(m, (x, Y), method="ggn-exact"), ALL_CASES),
    "flatness.hutchinson_trace": (lambda m, x: flatness.hutchinson_trace(m, (x, Y), probes=2), ALL_CASES),
    "flatness.hutchpp_trace": (lambda m, x: flatness.hutchpp_trace(m, (x, Y), matvecs=6), ALL_CASES),
    "flatness.hutchpp_diagonal": (lambda m, x: flatness.hutchpp_diagonal(m, (x, Y), matvecs=6), ALL_CASES),
    "flatness.hessian_eigenvalues": (lambda m, x: flatness.hessian_eigenvalues(m, (x, Y), k=1, iterations=4),
                                     ALL_CASES),
    "flatness.spectral_density": (lambda m, x: flatness.spectral_density(m, (x, Y), iterations=4, probes=1),
                                  ALL_CASES),
    "flatness.top_hessian_eigenvalue": (
        lambda m, x: flatness.top_hessian_eigenvalue(m, (x, Y), iterations=2), ALL_CASES),
    "flatness.normalized_sharpness": (lambda m, x: flatness.normalized_sharpness(m, (x, Y)), ALL_CASES),
    "flatness.rescale_nodes": (lambda m, x: flatness.rescale_nodes(m), ("meta-model",)),
    "flatness.check_rescaling_invariance": (  # in float64, where the nan-logits model does not overflow
        lambda m, x: flatness.check_rescaling_invariance(m, (x, Y)), ("meta-model", *IMAGE_CASES)),
    "flatness.compute_measures": (
        lambda m, x: flatness.compute_measures(m, (x, Y), names=["normalized_sharpness", "log_spectral_product",
                                                                  "ggn_trace"]), ALL_CASES),
    "flatness.log_spectral_product": (lambda m, x: flatness.log_spectral_product(m), ("meta-model",)),
    "flatness.log_frobenius_product": (lambda m, x: flatness.log_frobenius_product(m), ("meta-model",)),
    "flatness.pacbayes_flatness": (
        lambda m, x: flatness.pacbayes_flatness(m, (x, Y), samples=2, steps=2), ALL_CASES),
    "flatness.adaptive_average_sharpness": (
        lambda m, x: flatness.adaptive_average_sharpness(m, (x, Y), samples=2), ALL_CASES),
    "flatness.balanced_normalized_sharpness": (
        lambda m, x: flatness.balanced_normalized_sharpness(m, (x, Y)), ALL_CASES),
    "flatness.balance_attention": (lambda m, x: flatness.balance_attention(m), ("meta-model",)),
    "flatness.transform_attention": (lambda m, x: flatness.transform_attention(m), ("meta-model",)),
    # compression
    "compression.SquaredGradientStatistics": (lambda m, x: compression.SquaredGradientStatistics(m), ("meta-model",)),
    "compression.attach_squared_gradient_statistics": (
        lambda m, x: compression.attach_squared_gradient_statistics(m), ("meta-model",)),
    "compression.create_compression": (lambda m, x: compression.create_compression("vgc", model=m), ("meta-model",)),
    # training
    "training.train": (_train, ALL_CASES),
    "training.evaluate": (lambda m, x: training.evaluate(m, _dataset(x)), ALL_CASES),
}

NOT_APPLICABLE = {
    # lipschitz: rule registry, operator algebra and result types; losses take logits inside a training step
    # (the trainer refuses a non-finite loss as divergence)
    **dict.fromkeys(["lipschitz." + n for n in (
        "register_bound", "find_rule", "OpCall", "Factor", "LinearOp", "LipschitzBound", "LayerBound", "OperatorNorm",
        "LipschitzEstimate", "eval_mode", "guaranteed_norm", "power_iteration", "conv2d_fft_norm", "lmt_loss",
        "lmt_logits", "CWarmup", "Certificate", "Tightness", "AttackResult", "LMTObjective", "lmt_objective")],
        "no model or images (the LMT objective runs inside train's step, on data train has checked)"),
    # fourier: constants, frequency bookkeeping, basis and perturbation generators, plots of results, result
    # types, wrappers that run nothing until called by an analysis above
    **dict.fromkeys(["fourier." + n for n in (
        "DEFAULT_PHASE", "NORMS", "WAVES", "fourier_basis", "fourier_basis_batch", "half_plane", "is_self_conjugate",
        "canonical_index_map", "to_full_map", "AppliedPerturbation", "fourier_perturbation", "shape_directions",
        "sign_patterns", "FourierHeatmap", "heatmap_draws", "strided_frequencies", "band_frequencies",
        "canonical_rows", "with_normalization", "Normalized", "BatchSizer", "ModelRunner", "plot_fourier_maps",
        "plot_perturbation", "SEARCHES", "Candidates", "UniversalPerturbation", "PerturbationReport",
        "enumerate_candidates", "halving_schedule", "RandomNoiseBaseline", "FourierCombination", "project_budget",
        "circular_shift", "random_shifts", "GradientSpectrum", "rank_correlation")], "no model or images"),
    # flatness: result types, the measure registry, per-layer solvers on given matrices, rank statistics
    **dict.fromkeys(["flatness." + n for n in (
        "HessianDiagonal", "TraceEstimate", "EigenEstimate", "LayerSharpness", "NormalizedSharpness",
        "aggregate_layer", "solve_layer", "RescalingInvariance", "InvarianceRow", "Measure", "MeasureSet",
        "MeasureSpec", "register_measure", "available_measures", "kendall_tau", "granulated_tau",
        "MeasureCorrelation", "correlate_measures", "SignErrors", "sign_errors", "TauDifference",
        "tau_difference", "TraceSketch", "DiagonalSketch", "Eigenvalues", "SpectralDensity", "BalancedSharpness",
        "register_attention", "linear_heads", "AttentionBlock")], "no model or images"),
    # compression: hooks run inside DDP on gradient buckets; states are built without a model (their saved
    # state is tested below); results
    **dict.fromkeys(["compression." + n for n in (
        "METHODS", "CompressionStatistics", "StromState", "TopKState", "TorchHookState", "VarianceCompressionState",
        "strom_hook", "topk_hook", "torch_hook", "variance_hook", "warm_up", "LagReport", "CompressionLagWarning")],
        "no model or images"),
    # training: settings and result types, protocols, the device resolver, checkpoint files (tested below);
    # cross_entropy_loss is the objective train calls at every step on data it has checked (train refuses NaN
    # logits at its first step and a non-finite loss later as divergence)
    **dict.fromkeys(["training." + n for n in (
        "cross_entropy_loss", "TrainConfig", "EpochMetrics", "TrainResult", "Objective", "Stateful",
        "steps_per_epoch", "resolve_device", "save_checkpoint", "load_checkpoint", "check_state_dict_shapes",
        "CHECKPOINT_FORMAT", "Plugin", "RunContext", "GradientClipping", "WeightAverage", "world",
        "config_from_dict", "Batches")],
        "no model or images (plugins run inside train's step; Batches iterates data train and evaluate check)"),
    # the data contract: DataSource is what data_source returns (its reading is data_source's row)
    "datasource.DataSource": "no model or images (built by data_source, whose batches are tested above)",
}


def test_every_public_name_is_in_the_table():
    public = {f"{part}.{name}" for part, module in PARTS.items() for name in module.__all__}
    assert public - set(TABLE) - set(NOT_APPLICABLE) == set()
    assert (set(TABLE) | set(NOT_APPLICABLE)) - public == set()
    assert set(TABLE).isdisjoint(NOT_APPLICABLE)


ROWS = [(name, case) for name, (_, cases) in TABLE.items() for case in cases]


@pytest.mark.parametrize("name, case", ROWS, ids=[f"{n}-{c}" for n, c in ROWS])
def test_hostile_values_give_a_result_or_one_sturdy_error(name, case):
    call, _ = TABLE[name]
    make_model, make_images, expected = CASES[case]
    expected = ACCEPTED if (name, case) in ACCEPTED_HERE else expected
    model, x = make_model(), make_images()
    try:
        result = call(model, x)
    except SturdyError as exc:
        message = str(exc)
        assert expected == REFUSED, f"{name} refused {case}, which the rules accept: {message}"
        assert "\n" not in message.strip() and 20 < len(message) < 400, message
        if case in ("nan-pixel", "nan-logits", "uint8-images"):
            assert isinstance(exc, DataError), f"{case} must be a DataError, got {type(exc).__name__}: {message}"
        if case == "meta-model":
            assert isinstance(exc, ConfigurationError) and "meta" in message, message
        return
    assert expected == ACCEPTED, f"{name} returned a result for {case}, which the rules refuse: {result!r}"[:400]


# ----------------------------------------------------------------------------- saved state and checkpoints


def test_a_compression_state_with_nan_residuals_is_refused():
    state, _ = compression.create_compression("vgc", model=_model())
    saved = state.state_dict()
    saved["buffers"]["residual"] = {"1.weight": torch.tensor([1.0, float("nan")])}
    fresh, _ = compression.create_compression("vgc", model=_model())
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in residual\.1\.weight"):
        fresh.load_state_dict(saved)
    saved["buffers"]["residual"] = {"1.weight": torch.ones(2)}
    fresh.load_state_dict(saved)  # finite state loads


def test_a_checkpoint_of_meta_tensors_is_refused_when_read(tmp_path):
    from sturdy.experiments.train_job import TrainJob, fit, load_trained_model

    fit(TrainJob(model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(tmp_path)), progress=False)
    path = tmp_path / "model.pt"
    ckpt = training.load_checkpoint(path)
    ckpt["model"] = {k: v.to("meta") for k, v in ckpt["model"].items()}
    training.save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=r"meta device.*no values"):
        training.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="meta device"):
        load_trained_model(path)


def test_a_float16_result_matches_the_float32_one():
    """Accepting half-precision images means computing in the model's dtype, not a different answer."""
    model = _model()
    half = X.half()
    loss16, acc16 = training.evaluate(model, _dataset(half))
    loss32, acc32 = training.evaluate(model, _dataset(half.float()))
    assert acc16 == acc32 and math.isclose(loss16, loss32, rel_tol=1e-6)


def test_flatness_measure_refuses_a_stored_data_set_that_does_not_fit_the_weights(tmp_path):
    """The check `sturdy evaluate` makes: a checkpoint whose job names a data set of other image shapes."""
    from sturdy.experiments.flatness import measure_checkpoint
    from sturdy.experiments.train_job import TrainJob, fit

    fit(TrainJob(model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(tmp_path)), progress=False)
    path = tmp_path / "model.pt"
    ckpt = training.load_checkpoint(path)
    ckpt["extra"]["job"]["dataset"] = "synthetic"
    training.save_checkpoint(ckpt, path)
    with pytest.raises(ConfigurationError, match=r"'synthetic' has images of shape \(3, 32, 32\), the model was "
                                                 r"trained on \(1, 8, 8\)"):
        measure_checkpoint(path, out=tmp_path / "measures", measures=["log_spectral_product"], progress=False)
    assert not (tmp_path / "measures").exists()
