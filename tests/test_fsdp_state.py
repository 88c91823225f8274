"""`ShardedStateIO` on 2 gloo ranks: a full state gathered from an FSDP2 model (rank 0, as the
checkpoint writes it) and scattered back restores every rank's shards and optimiser state."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from padd.pipeline.distributed import ShardedStateIO, apply_fsdp2, full_tensor, shutdown


class _Stack(torch.nn.Module):
    """The smallest model `apply_fsdp2` shards: a `layers` ModuleList, one FSDP unit each."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Stack()


def _step(model, optimizer, seed):
    torch.manual_seed(seed)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(model) -> dict:
    return {n: full_tensor(p).clone() for n, p in model.named_parameters()}


def _train_save_restore(rank: int, out_file: str) -> None:
    io = ShardedStateIO()
    model = apply_fsdp2(_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, optimizer, seed=1)
    model_sd, optim_sd = io.model_state(model), io.optimizer_state(model, optimizer)
    saved = _full(model)
    # Rank 0 holds the full state (as written to disk); every rank reads it back on resume.
    shared = [model_sd, optim_sd] if rank == 0 else [None, None]
    dist.broadcast_object_list(shared, src=0)
    _step(model, optimizer, seed=2)  # move away from the saved state
    io.load_model_state(model, shared[0])
    io.load_optimizer_state(model, optimizer, shared[1])
    restored = _full(model)
    _step(model, optimizer, seed=3)
    resumed = _full(model)
    if rank == 0:
        torch.save({"saved": saved, "restored": restored, "resumed": resumed, "sd": model_sd}, out_file)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # The sharded model lives in the inner frame, so it is gone before the group is shut
        # down, as in `padd train`; `shutdown` then frees the group before the interpreter exits.
        _train_save_restore(rank, out_file)
    finally:
        shutdown()


def test_gather_then_scatter_restores_a_sharded_model_and_its_optimiser(tmp_path):
    out = tmp_path / "result.pt"
    init = tempfile.mktemp(dir=tmp_path)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(init, str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    # The gathered state is the full, unsharded tensors.
    for name, value in result["saved"].items():
        assert torch.equal(result["sd"][name], value), name
        assert torch.equal(result["restored"][name], value), name
    # Oracle for the optimiser: the same three steps, unsharded, with the same inputs.
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, optimizer, seed=1)
    _step(model, optimizer, seed=3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["resumed"][name], p.detach(), rtol=1e-5, atol=1e-6)


def test_a_model_without_decoder_layers_is_refused_not_left_unsharded():
    with pytest.raises(ValueError, match="has none"):
        apply_fsdp2(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)))
    empty = torch.nn.Module()
    empty.layers = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="has none"):  # an empty stack would shard nothing either
        apply_fsdp2(empty)
