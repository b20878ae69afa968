"""The training core's data contract, augmentation, mixed precision, plugins, resume and refusals
(docs/design.md, "Training core").

Each run is compared with another path to the same numbers: a streamed data set with the in-memory one, loader
workers with none, uint8 pixels with float ones, the plugins with a hand-written loop, a resumed run with a straight
one. The hand-written references (``*_reference``) are at the end of the file.
"""

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sturdy.checkpoints import load_checkpoint
from sturdy.data import ImageDataset, load_dataset
from sturdy.errors import ConfigurationError, DataError, SturdyError
from sturdy.training import GradientClipping, Plugin, TrainConfig, WeightAverage, train
from sturdy.training.augment import crop_flip, crop_padding
from sturdy.training.batches import Batches, shard

BIT_EXACT = dict(rtol=0, atol=0)
EMA_TOL = dict(rtol=1e-5, atol=1e-6)  # float32 average against a float64 reference over a few dozen steps
CLIP_REL_TOL = 1e-5  # clip_grad_norm_ scales by max_norm / (norm + 1e-6): the result sits at max_norm, rounded
N_TRAIN = 192  # digits images of the fast tests: 6 steps of 32 per epoch


# --------------------------------------------------------------------------------------------- data and models


class PairDataset(Dataset):
    """A plain map-style data set of ``(image, label)`` pairs (no ``images`` attribute: it is streamed)."""

    def __init__(self, images, labels, *, num_classes=None):
        self._images, self._labels = images, labels
        if num_classes is not None:
            self.num_classes = num_classes

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return self._images[i], int(self._labels[i])


class MemmapDataset(Dataset):
    """uint8 images read item by item from a memory-mapped ``.npy`` file."""

    def __init__(self, path, labels):
        self._array = np.load(path, mmap_mode="r")
        self._labels = labels

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self._array[i])), int(self._labels[i])


class MemmapImages:
    """An ``ImageDataset``-like object whose ``images`` are a uint8 tensor over a memory-mapped ``.npy``."""

    def __init__(self, path, labels, num_classes):
        with warnings.catch_warnings():  # the mapping is read-only and so is the tensor: training never writes it
            warnings.simplefilter("ignore", UserWarning)
            self.images = torch.from_numpy(np.load(path, mmap_mode="r"))
        self.labels, self.num_classes = labels, num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class BadItemDataset(PairDataset):
    """Item ``at`` is broken: ``"shape"`` (a 9x9 image), ``"label"`` (label 10 of 10 classes) or ``"type"``."""

    def __init__(self, images, labels, *, at, fault, num_classes=None):
        super().__init__(images, labels, num_classes=num_classes)
        self.at, self.fault = at, fault

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if i == self.at and self.fault == "shape":
            return torch.zeros(1, 9, 9), y
        if i == self.at and self.fault == "label":
            return x, 10
        if self.fault == "type":
            return x.tolist(), y
        return x, y


class TensorPairs:
    """An ``ImageDataset``-like object with ``images`` and ``targets`` tensors and no class count."""

    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train").subset(range(N_TRAIN))


def _digits_uint8(data):
    """The digits images as uint8 pixels, and the float images those pixels stand for (``pixels / 255``)."""
    pixels = torch.round(data.images * 255).to(torch.uint8)
    return pixels, pixels.float() / 255


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def _config(**overrides):
    values = dict(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", schedule="cosine", seed=3, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **BIT_EXACT, msg=k)


def _trained(data, config, model_fn=_mlp, **kwargs):
    model = model_fn()
    result = train(model, data, config=config, progress=False, **kwargs)
    return _weights(model), result


# ------------------------------------------------------------------------------------------- one data contract


def test_streamed_dataset_trains_bit_identically_to_the_in_memory_one(digits):
    config = _config()
    in_memory, r1 = _trained(digits, config)
    streamed, r2 = _trained(PairDataset(digits.images, digits.labels), config)
    _assert_same_weights(in_memory, streamed)
    assert r1.steps_per_epoch == r2.steps_per_epoch == math.ceil(N_TRAIN / 32)
    assert [m.train_loss for m in r1.history] == [m.train_loss for m in r2.history]
    other_seed, _ = _trained(digits, _config(seed=4))  # the comparison can fail: the order matters
    assert any(not torch.equal(other_seed[k], in_memory[k]) for k in in_memory)


def test_streamed_and_in_memory_agree_with_augmentation(digits):
    config = _config(augment="crop-flip")
    in_memory, _ = _trained(digits, config)
    streamed, _ = _trained(PairDataset(digits.images, digits.labels), config)
    _assert_same_weights(in_memory, streamed)


def test_loader_workers_give_the_same_weights_as_none(digits):
    data = PairDataset(digits.images, digits.labels)
    config = _config(epochs=1, augment="crop-flip")
    _assert_same_weights(_trained(data, config)[0], _trained(data, _config(epochs=1, augment="crop-flip",
                                                                          workers=2))[0])


def test_uint8_pixels_train_like_the_float_images_they_stand_for(digits, tmp_path):
    pixels, floats = _digits_uint8(digits)
    config = _config(augment="crop-flip")
    reference, _ = _trained(ImageDataset(floats, digits.labels, 10), config)
    path = tmp_path / "pixels.npy"
    np.save(path, pixels.numpy())
    for data in (PairDataset(pixels, digits.labels), MemmapDataset(path, digits.labels),
                 MemmapImages(path, digits.labels, 10)):
        _assert_same_weights(reference, _trained(data, config)[0])
    plain = _trained(ImageDataset(digits.images, digits.labels, 10), config)[0]  # not /255-rounded: differs
    assert any(not torch.equal(plain[k], reference[k]) for k in reference)


# --------------------------------------------------------------------------------------------------- crop-flip


def _batch(seed=0, b=6, c=3, h=32, w=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=gen) + 0.5  # no zero pixels: padding is recognisable


def test_crop_flip_matches_a_per_image_reference_loop():
    for h, w in ((32, 32), (8, 8), (12, 20)):
        x = _batch(h=h, w=w)
        got = crop_flip(x, generator=torch.Generator().manual_seed(11))
        want = crop_flip_reference(x, generator=torch.Generator().manual_seed(11))
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, **BIT_EXACT)


def test_crop_flip_outputs_are_padded_shifts_or_flips_of_their_inputs():
    x = _batch(b=16)
    out = crop_flip(x, generator=torch.Generator().manual_seed(5))
    p = crop_padding(32)
    assert p == 4 and crop_padding(8) == 1
    found = [_which_crop(x[i], out[i], p) for i in range(len(x))]
    assert all(f is not None for f in found), found
    assert len(set(found)) > 4  # offsets and flips vary within the batch
    assert {f[2] for f in found} == {False, True}


def test_augmentation_is_fixed_by_seed_and_epoch_and_changes_between_epochs(digits):
    def images(seed, epoch):
        batches = Batches(digits, batch_size=64, device=torch.device("cpu"), dtype=torch.float32, seed=seed,
                          shuffle=False, augment="crop-flip")
        return torch.cat([x for x, _ in batches.epoch(epoch)])

    first = images(3, 0)
    assert first.shape == digits.images.shape
    torch.testing.assert_close(first, images(3, 0), **BIT_EXACT)
    assert not torch.equal(first, images(3, 1))
    assert not torch.equal(first, images(4, 0))
    assert not torch.equal(first, digits.images)


# ------------------------------------------------------------------------------------- precision and layout


def test_bf16_autocast_trains_on_the_cpu(digits):
    seen = []

    def objective(model, x, y, *, epoch, step):
        logits = model(x)
        seen.append(logits.dtype)
        return F.cross_entropy(logits.float(), y), logits

    model = _small_cnn()
    result = train(model, digits, config=_config(amp="bf16"), objective=objective, progress=False)
    assert set(seen) == {torch.bfloat16}
    assert all(math.isfinite(m.train_loss) for m in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model


def test_fp16_on_the_cpu_is_refused_in_one_line_before_anything_is_written(digits, tmp_path):
    ckpt = tmp_path / "run" / "model.pt"
    ckpt.parent.mkdir()
    with pytest.raises(ConfigurationError, match="fp16 needs a CUDA device") as info:
        train(_mlp(), digits, config=_config(amp="fp16"), checkpoint_path=ckpt, progress=False)
    assert "\n" not in str(info.value)
    assert list(ckpt.parent.iterdir()) == []


def test_channels_last_runs_with_channels_last_weights_and_batches():
    gen = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen), 10)
    layouts = []

    def objective(model, x, y, *, epoch, step):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))

    model = cnn()
    config = _config(augment="crop-flip")
    result = train(model, data, config=_config(channels_last=True, augment="crop-flip"), objective=objective,
                   progress=False)
    assert layouts and all(layouts)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert all(math.isfinite(m.train_loss) for m in result.history)
    plain, _ = _trained(data, config, model_fn=cnn)
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, plain[k], rtol=1e-4, atol=1e-5)  # the same run in another summation order


# ----------------------------------------------------------------------------------------------------- plugins


class GradNorm(Plugin):
    """Records the global gradient norm the optimizer will see (after the plugins before it)."""

    def __init__(self):
        self.norms = []

    def after_backward(self, ctx, step):
        grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_gradient_clipping_bounds_the_norm_and_equals_a_hand_loop(digits):
    max_norm = 0.1
    config = _config(schedule="constant", lr=0.1)
    clip, seen = GradientClipping(max_norm), GradNorm()
    before = GradNorm()
    model = _mlp()
    train(model, digits, config=config, plugins=[before, clip, seen], progress=False)
    assert max(before.norms) > 2 * max_norm  # clipping was active: the test can fail
    assert max(seen.norms) <= max_norm * (1 + CLIP_REL_TOL)
    reference = _mlp()
    hand_loop_reference(reference, digits, config, clip=max_norm)
    _assert_same_weights(_weights(model), _weights(reference))
    unclipped = _mlp()
    hand_loop_reference(unclipped, digits, config, clip=None)
    assert any(not torch.equal(v, _weights(unclipped)[k]) for k, v in _weights(model).items())


def test_the_grad_clip_setting_is_the_clipping_plugin(digits):
    config = _config(schedule="constant", lr=0.1)
    by_plugin, _ = _trained(digits, config, plugins=[GradientClipping(0.1)])
    by_setting, _ = _trained(digits, _config(schedule="constant", lr=0.1, grad_clip=0.1))
    _assert_same_weights(by_plugin, by_setting)


def test_training_options_come_from_the_config_fields(tmp_path):
    from sturdy.cli import _job_from_args, build_parser

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--grad-clip", "0.5", "--augment",
                                      "crop-flip", "--amp", "bf16", "--channels-last", "--workers", "1",
                                      "--eval-batch-size", "64"])
    job = _job_from_args(args)
    c = job.config
    assert (c.grad_clip, c.augment, c.amp, c.channels_last, c.workers, c.eval_batch_size) == (
        0.5, "crop-flip", "bf16", True, 1, 64)
    assert job.options["explicit_options"] == ["amp", "augment", "channels_last", "eval_batch_size", "grad_clip",
                                               "workers"]
    assert _job_from_args(build_parser().parse_args(["train", "--out", "o"])).config == TrainConfig()


def test_weight_average_equals_an_ema_over_the_steps(digits):
    config = _config(schedule="constant")
    average = WeightAverage(decay=0.9)
    model = _mlp()
    train(model, digits, config=config, plugins=[average], progress=False)
    reference = _mlp()
    ema = hand_loop_reference(reference, digits, config, ema_decay=0.9)
    _assert_same_weights(_weights(model), _weights(reference))
    steps = config.epochs * math.ceil(N_TRAIN / config.batch_size)
    assert average.updates == steps
    assert average.average.keys() == ema.keys()
    for k in ema:
        torch.testing.assert_close(average.average[k].double(), ema[k], **EMA_TOL, msg=k)
        assert not torch.allclose(ema[k].float(), model.state_dict()[k], **EMA_TOL)  # an average, not the weights
    with average.swapped(model):
        torch.testing.assert_close(model[1].weight, average.average["1.weight"], **BIT_EXACT)
    torch.testing.assert_close(model[1].weight, reference[1].weight, **BIT_EXACT)


def test_weight_average_survives_resume_bit_exactly(digits, tmp_path):
    config = _config(epochs=3)
    straight = WeightAverage(decay=0.8)
    weights, _ = _trained(digits, config, plugins=[straight])
    ckpt = tmp_path / "model.pt"
    _trained(digits, config, plugins=[WeightAverage(decay=0.8)], checkpoint_path=ckpt, until_epoch=1)
    resumed = WeightAverage(decay=0.8)
    torch.manual_seed(123)
    weights2, result = _trained(digits, config, plugins=[resumed], checkpoint_path=ckpt)
    assert result.resumed_from_epoch == 1
    _assert_same_weights(weights, weights2)
    assert resumed.updates == straight.updates
    _assert_same_weights(straight.average, resumed.average)


# ------------------------------------------------------------------------------------------ resume, divergence


def test_resumed_streamed_augmented_run_equals_the_straight_run(digits, tmp_path):
    data = PairDataset(digits.images, digits.labels)
    config = _config(epochs=4, augment="crop-flip", optimizer="adam", lr=1e-2)

    def dropout_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))

    straight, full = _trained(data, config, model_fn=dropout_mlp)
    ckpt = tmp_path / "model.pt"
    _, first = _trained(data, config, model_fn=dropout_mlp, checkpoint_path=ckpt, until_epoch=2)
    assert len(first.history) == 2
    torch.manual_seed(999)  # whatever ran in between must not matter
    resumed, second = _trained(data, config, model_fn=dropout_mlp, checkpoint_path=ckpt)
    assert second.resumed_from_epoch == 2 and len(second.history) == 4
    _assert_same_weights(straight, resumed)
    assert [m.train_loss for m in full.history] == [m.train_loss for m in second.history]


def test_a_non_finite_loss_stops_within_sync_every_steps_keeping_the_last_checkpoint(digits, tmp_path):
    sync_every, bad_from = 2, (1, 1)  # (epoch, step in the epoch) of the first NaN loss
    calls = []

    def objective(model, x, y, *, epoch, step):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        calls.append((epoch, step))
        if (epoch, step % 6) >= bad_from:
            loss = loss * float("nan")
        return loss, logits

    ckpt = tmp_path / "model.pt"
    after_first = {}

    def remember(metrics):
        after_first.setdefault("bytes", ckpt.read_bytes())

    config = _config(epochs=3, sync_every=sync_every)
    with pytest.raises(ConfigurationError, match="diverged at epoch 2, steps") as info:
        train(_mlp(), PairDataset(digits.images, digits.labels), config=config, objective=objective,
              checkpoint_path=ckpt, on_epoch_end=remember, progress=False)
    message = str(info.value)
    assert "\n" not in message and "checkpoint of epoch 1 is kept" in message
    bad_calls = [c for c in calls if (c[0], c[1] % 6) >= bad_from]
    assert 1 <= len(bad_calls) <= sync_every
    assert ckpt.read_bytes() == after_first["bytes"]
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


# ------------------------------------------------------------------------------------------------ bad input


def _late_fault(n, config, fault, num_classes=None):
    """Random data whose 1000th item read in the first epoch (batch 20 of 50) is broken."""
    gen = torch.Generator().manual_seed(0)
    at = int(shard(n, seed=config.seed, epoch=0, rank=0, world=1)[999])
    return BadItemDataset(torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen),
                          at=at, fault=fault, num_classes=num_classes)


@pytest.mark.parametrize("fault,workers,match", [
    ("shape", 0, r"batch 20: reading its items failed \(RuntimeError: stack expects each tensor to be equal size"),
    ("shape", 2, r"batch 20: reading its items failed \(RuntimeError: stack expects each tensor to be equal size"),
    ("label", 0, "batch 20: labels in .* but the classes are 0..9"),
    ("type", 0, r"batch 1: items must be \(image tensor, label\) pairs, got images of type list"),
])
def test_a_bad_item_late_in_the_data_stops_in_one_line_with_nothing_written(tmp_path, fault, workers, match):
    config = _config(epochs=1, batch_size=50, workers=workers, schedule="constant")
    data = _late_fault(1200, config, fault, num_classes=10)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(DataError, match=match) as info:
        train(_mlp(), data, config=config, checkpoint_path=out / "model.pt", progress=False)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_a_label_beyond_the_models_classes_is_a_data_error_without_a_declared_class_count(tmp_path):
    config = _config(epochs=1, batch_size=50)
    data = _late_fault(1200, config, "label")
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(DataError, match="batch 20: labels in .* but the classes are 0..9") as info:
        train(_mlp(), data, config=config, checkpoint_path=out / "model.pt", progress=False)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_tensors_with_targets_and_no_class_count_train_in_memory_and_check_late_labels(digits, tmp_path):
    config = _config(epochs=1)
    _assert_same_weights(_trained(digits, config)[0], _trained(TensorPairs(digits.images, digits.labels), config)[0])
    config = _config(epochs=1, batch_size=50)
    late = _late_fault(1200, config, "label")
    labels = torch.tensor([late[i][1] for i in range(len(late))])
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(DataError, match="batch 20: labels in .* but the classes are 0..9") as info:
        train(_mlp(), TensorPairs(late._images, labels), config=config, checkpoint_path=out / "model.pt",
              progress=False)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("field,value,match", [
    ("augment", "mixup", "augment must be one of none, crop-flip, got 'mixup'"),
    ("amp", "fp8", "amp must be one of none, bf16, fp16, got 'fp8'"),
    ("workers", -1, r"workers must be an integer in \[0, 64\], got -1"),
    ("sync_every", 0, "sync_every must be an integer >= 1"),
    ("channels_last", "yes", "channels_last must be True or False"),
])
def test_bad_settings_are_refused_in_one_line(field, value, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        _config(**{field: value})
    assert isinstance(info.value, SturdyError) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- references


def crop_flip_reference(x, *, generator):
    """One image at a time: zero-pad by ``p``, crop at the drawn offset, flip when drawn (same draws, same order
    as :func:`crop_flip`)."""
    b, _, h, w = x.shape
    p = crop_padding(h)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.zeros(x.shape[1], h + 2 * p, w + 2 * p, dtype=x.dtype)
        padded[:, p:p + h, p:p + w] = x[i]
        crop = padded[:, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


def _which_crop(image, out, p):
    """The ``(dy, dx, flipped)`` that turns ``image`` into ``out``, or ``None``."""
    _, h, w = image.shape
    padded = F.pad(image, (p, p, p, p))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(crop.flip(-1) if flipped else crop, out):
                    return dy, dx, flipped
    return None


def hand_loop_reference(model, data, config, *, clip=None, ema_decay=None):
    """A plain PyTorch loop in the run's order (constant or cosine schedule, SGD): optional clipping and a
    float64 EMA of the floating-point state after every step (returned)."""
    steps = math.ceil(len(data) / config.batch_size)
    total = config.epochs * steps
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    factor = (lambda s: 1.0) if config.schedule == "constant" else (
        lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema = {}
    for epoch in range(config.epochs):
        order = shard(len(data), seed=config.seed, epoch=epoch, rank=0, world=1)
        model.train()
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            opt.step()
            sched.step()
            if ema_decay is not None:
                for k, v in model.state_dict().items():
                    w = v.detach().double()
                    ema[k] = w.clone() if k not in ema else ema_decay * ema[k] + (1 - ema_decay) * w
    return ema


@pytest.mark.parametrize("argv, match", [
    (["--augment", "zoom"], "invalid choice: 'zoom'"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--workers", "-1"], "--workers"),
    (["--grad-clip", "-1"], "grad_clip must be a finite number >= 0"),
])
def test_bad_training_options_exit_2_with_one_line_and_nothing_written(tmp_path, capsys, argv, match):
    from sturdy.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "linear", "--epochs", "1", "--out", str(out), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()
