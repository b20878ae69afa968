"""Compression inside FSDP2 (``--shard``), the light tier: the layout of FSDP2's reduce-scatter input against
torch's own copy-in, the per-sample statistics of a sharded model against the unsharded model's, and the
one-line refusals. The two-process checks (same selections and weights as DDP, kill-and-resume) are in
test_compression_sharded_runs.py."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401 - registers torch.ops.fsdp.chunk_cat, FSDP2's copy-in
from torch import nn

from sturdy.compression import attach_squared_gradient_statistics
from sturdy.compression.sharded import ShardBucket, shard_layout
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.experiments.compression import compression_options, training_plugin
from sturdy.experiments.parallel import parallel_options
from sturdy.experiments.resume_identity import check_same_run
from sturdy.experiments.train_job import TrainJob, run_identity
from sturdy.models import create_model
from sturdy.training.sharding import is_sharded, shard_blocks, shard_model

STATS_RTOL, STATS_ATOL = 1e-5, 1e-7  # float32 sums of per-sample products in another order


@pytest.mark.parametrize("world", [2, 3])
def test_the_layout_reads_torchs_reduce_scatter_input_back_in_parameter_order(world):
    g = torch.Generator().manual_seed(world)
    shapes = [torch.Size([5, 3]), torch.Size([7]), torch.Size([2, 2, 3]), torch.Size([world * 2, 1])]
    grads = [torch.randn(s, generator=g) for s in shapes]
    row = sum(-(-s[0] // world) * (s.numel() // s[0]) for s in shapes)
    reference = torch.full((world, row), float("nan"))
    torch.ops.fsdp.chunk_cat(grads, dim=0, num_chunks=world, out=reference)  # FSDP2's own copy-in
    flat = torch.cat([x.reshape(-1) for x in grads])
    covered = torch.zeros(flat.numel(), dtype=torch.int64)
    for rank in range(world):
        lay = shard_layout(shapes, world=world, rank=rank)
        assert lay.input_numel == reference.numel()
        assert torch.equal(reference.reshape(-1)[lay.gather], flat)
        assert torch.equal(reference[rank][lay.own_positions], flat[lay.own_sources])
        padding = torch.ones(row, dtype=torch.bool)
        padding[lay.own_positions] = False
        assert bool((reference[rank][padding] == 0).all())  # everything else in the row is padding
        covered[lay.own_sources] += 1
    assert bool((covered == 1).all())  # every element belongs to exactly one rank's shard


def test_a_group_looks_like_a_ddp_bucket():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    bucket = ShardBucket(3, params, torch.arange(10.0), last=True)
    assert bucket.index() == 3 and bucket.is_last() and bucket.parameters() == params
    assert [tuple(v.shape) for v in bucket.gradients()] == [(2, 3), (4,)]
    assert torch.equal(bucket.gradients()[1], torch.arange(6.0, 10.0))


def test_blocks_are_the_layers_below_single_wrappers():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    wrapped = nn.Sequential(nn.Identity(), nn.Sequential(net))
    assert shard_blocks(wrapped) == [net[1], net[3]]
    assert shard_blocks(nn.Linear(2, 2)) == []


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_statistics_of_the_sharded_model_equal_the_unsharded_ones(one_rank_group):
    """The per-sample hooks read the module inputs and output gradients while FSDP2 has the parameters unsharded
    (forward and backward); the sums equal those of the same model without FSDP2."""
    torch.manual_seed(0)
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    plain = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    sharded_stats = attach_squared_gradient_statistics(model)
    plain_stats = attach_squared_gradient_statistics(plain)
    originals = list(model.parameters())
    groups = shard_model(model)
    assert is_sharded(model) and len(groups) >= 2
    assert sorted(n for g in groups for n in g.names) == sorted(names)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for net in (model, plain):
        nn.functional.cross_entropy(net(x), y).backward()
    for name, p, q in zip(names, originals, plain.parameters()):
        torch.testing.assert_close(sharded_stats.get(p), plain_stats.get(q), rtol=STATS_RTOL, atol=STATS_ATOL,
                                   msg=name)


def test_blocks_sharing_a_weight_stay_in_the_models_unit(one_rank_group):
    """FSDP2 manages a parameter in one unit: tied blocks are not sharded on their own (the whole model's unit
    holds them), the others still are, and the model trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 3))
    model[2].weight = model[0].weight
    groups = shard_model(model)
    assert [g.module for g in groups if g.module is not model] == [model[3]]
    assert sorted(n for g in groups for n in g.names) == sorted(n for n, _ in model.named_parameters())
    nn.functional.cross_entropy(model(torch.rand(5, 4)), torch.randint(0, 3, (5,))).backward()
    assert all(p.grad is not None for p in model.parameters())


def _job(**options):
    return TrainJob.from_dict(dict(dataset="digits", model="mlp", out="unused", options=options))


def test_sharding_refusals_are_one_line_configuration_errors():
    with pytest.raises(ConfigurationError, match="--shard.*at least 2 processes"):
        parallel_options(_job(nproc=1, shard=True))
    with pytest.raises(ConfigurationError, match="--shard is on or off"):
        parallel_options(_job(nproc=2, shard=1))
    for method in ("powersgd", "fp16"):
        with pytest.raises(ConfigurationError, match=f"--compress {method} has no sharded form"):
            training_plugin(_job(nproc=2, shard=True, compress=method))
    assert training_plugin(_job(nproc=2, shard=True, compress="none")) is None
    assert compression_options(_job(nproc=2, shard=True, compress="topk"))["compress"] == "topk"


def test_a_ddp_checkpoint_is_refused_with_shard_and_the_reverse(tmp_path):
    ddp, sharded = run_identity(_job(nproc=2), world_size=2), run_identity(_job(nproc=2, shard=True), world_size=2)
    assert "sharding" not in ddp  # as in checkpoints written before sharding existed
    for there, here, words in ((ddp, sharded, "sharding: not used there, 'fsdp2' here"),
                               (sharded, ddp, "sharding: 'fsdp2' there, not used here")):
        with pytest.raises(CheckpointError, match=words):
            check_same_run({"extra": {"identity": there}}, tmp_path / "model.pt", here)
    with pytest.raises(CheckpointError, match="world size: 2 there, 4 here"):
        check_same_run({"extra": {"identity": sharded}}, tmp_path / "model.pt",
                       run_identity(_job(nproc=4, shard=True), world_size=4))


def test_a_bf16_group_is_reduced_through_the_hook_with_float32_residuals(one_rank_group):
    """The whole reduce-scatter path on one rank: FSDP2's input (bf16, padded) read back, top-k selected from a
    float32 residual, this rank's shard of the average written out in FSDP2's layout."""
    from sturdy.compression import TopKState, topk_hook
    from sturdy.compression.sharded import ShardedReduceScatter, _Steps
    from sturdy.training.sharding import ShardGroup

    params = (torch.zeros(3, 2), torch.zeros(5))
    state = TopKState(ratio=0.25, start_iter=0, named_parameters=[("w", params[0]), ("b", params[1])])
    group = ShardGroup(0, nn.Identity(), ("w", "b"), params, tuple(p.shape for p in params))
    comm = ShardedReduceScatter(group, state=state, hook=topk_hook, steps=_Steps(1))
    grad = torch.tensor([0.5, -4.0, 0.25, 1.0, 3.0, -0.125, 2.0, 0.0, -1.5, 0.75, 6.0], dtype=torch.bfloat16)
    fsdp_input = comm.allocate((11,), dtype=torch.bfloat16, device=torch.device("cpu"))
    torch.ops.fsdp.chunk_cat([grad[:6].view(3, 2), grad[6:]], dim=0, num_chunks=1, out=fsdp_input.view(1, -1))
    out = comm.allocate((11,), dtype=torch.bfloat16, device=torch.device("cpu"))
    comm(out, fsdp_input, dist.group.WORLD, dist.ReduceOp.AVG)
    sent = torch.zeros(11, dtype=torch.bfloat16)
    sent[[1, 4, 10]] = grad[[1, 4, 10]]  # ceil(0.25 * 11) = 3 largest magnitudes
    assert torch.equal(out, sent)
    residual = state.residual(0)
    assert residual.dtype == torch.float32
    assert torch.equal(residual, (grad.float() - sent.float()))
    assert state.statistics().elements_sent == 3 and state.iter == 1


def test_a_method_without_a_sharded_form_is_refused_before_any_worker_starts():
    from sturdy.experiments.lipschitz import LMTPlugin
    from sturdy.experiments.train_job import check_shardable_plugins

    job = _job(nproc=2, shard=True)
    with pytest.raises(ConfigurationError, match="--shard: LMTPlugin .* has no sharded form"):
        check_shardable_plugins(job, [LMTPlugin()])
    check_shardable_plugins(job, [training_plugin(_job(nproc=2, shard=True, compress="vgc"))])
    check_shardable_plugins(_job(nproc=2), [LMTPlugin()])  # DDP takes every method


def test_vgc_under_shard_refuses_a_layer_without_a_per_sample_rule():
    from sturdy.errors import UnsupportedModuleError
    from sturdy.experiments.compression import CompressionPlugin
    from sturdy.experiments.train_job import TrainContext

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 3))

        def forward(self, x):
            return x @ self.w

    job = _job(compress="vgc", nproc=2, shard=True)
    ctx = TrainContext(job=job, input_shape=(1, 4), num_classes=3, steps_per_epoch=2, device=torch.device("cpu"))
    plugin = CompressionPlugin(compression_options(job))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Own\) has no per-sample gradient rule"):
        plugin.setup(nn.Sequential(nn.Linear(4, 4), Own()), ctx)
    assert plugin.setup(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), ctx).shard_hook is not None
