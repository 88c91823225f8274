"""torch.distributed for `torchrun --nproc_per_node=N -m padd train CONFIG`.

- Data parallel: each rank takes its shard of every step's prompts and generates its own rollouts;
  gradients are averaged across ranks right before each optimiser step (the DDP all-reduce,
  done as an optimiser pre-step hook because the trainer owns the backward passes and calls the
  model's `generate`, which a `DistributedDataParallel` wrapper would hide).
- FSDP2 (`fully_shard` per decoder layer, then the root) when the model should be sharded.
- Stage IV: the trainer sums expert loads and advantages over ranks; after every step the bias is
  additionally averaged, so every rank provably holds the same bias.
- Single-rank code runs unchanged: every helper is a no-op when the world size is 1.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from padd.training.checkpointing import StateIO

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()  # the context of a run without torchrun


def init_from_env(backend: str = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, ...);
    a collective that waits longer than `timeout_minutes` fails the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> None:
    """Leave the process group and free it while the interpreter is still whole.

    Call it after the models and optimisers that used the group are out of scope. Gloo's worker
    threads drop their last finished work (and the tensors it holds) on their own; if the group
    outlives `destroy_process_group` (a device mesh in a reference cycle holds it), that happens
    during interpreter shutdown and aborts the process ("terminate called without an active
    exception", torch 2.13, about one exit in eight on 2 cores). Collecting the cycles before
    and after makes the group's destructor join those threads now.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of a step's items (strided, so shards differ by at most one item)."""
    return list(items[ctx.rank :: ctx.world_size]) if ctx.enabled else list(items)


def gather_to_main(obj: T, ctx: DistContext) -> list[T] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place mean over ranks."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(ctx.world_size)
    return t


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is true on one (an interruption must stop all ranks together)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main_rank_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's `flag` on every rank. For "is this step done?": rank 0 writes the done markers, so
    a rank that looked later could see a marker the others did not and skip their collectives."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def average_gradients_before_step(optimizer: torch.optim.Optimizer, ctx: DistContext) -> Any:
    """Register the data-parallel gradient all-reduce as an optimiser pre-step hook."""
    if not ctx.enabled:
        return None

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step
        all_reduce_mean_(flat, ctx)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    return optimizer.register_step_pre_hook(hook)


def should_shard(model: torch.nn.Module, strategy: str, ctx: DistContext) -> bool:
    """FSDP2 when asked, or under "auto" when weights + Adam state would exceed 40% of the GPU."""
    if not ctx.enabled or strategy == "ddp":
        return False
    if strategy == "fsdp":
        return True
    if ctx.device.type != "cuda":
        return False
    bytes_needed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    return bytes_needed > 0.4 * torch.cuda.get_device_properties(ctx.device).total_memory


def apply_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every decoder layer, then the root (the module keeps its class and `generate`).

    The decoder layers are `model.model.layers` (a transformers causal LM) or `model.layers`.
    Raises `ValueError` for a model without them: sharding its root alone would gather every
    weight at once in each forward, which is the memory FSDP is asked to save.
    """
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"apply_fsdp2 shards per decoder layer, and {type(model).__name__} has none "
            "(no non-empty `model.layers` or `layers` ModuleList); use distributed.strategy=ddp"
        )
    # FSDP is imported only by a sharded run: it is slow to import and absent from some torch builds.
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    # The trainer also calls the backbone and the LM head on their own (hidden states for the
    # fused KD loss), so each gets its own unit: a unit's weights are gathered in its own forward.
    if inner is not model:
        fully_shard(inner)
    head = getattr(model, "lm_head", None)  # absent from a bare backbone
    if head is not None:
        fully_shard(head)
    fully_shard(model)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: a sharded (DTensor) parameter is all-gathered."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ShardedStateIO(StateIO):
    """The trainer's `state_io` under FSDP2: full (unsharded) states on CPU for checkpoints,
    sharded back like the live parameters on resume. Gathering is a collective: every rank
    calls it (rank 0 writes what it returns)."""

    def model_state(self, model: torch.nn.Module) -> dict:
        return {k: _cpu_copy(v) for k, v in model.state_dict().items()}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        state = optimizer.state_dict()
        gathered = {
            idx: {k: _cpu_copy(v) if torch.is_tensor(v) else v for k, v in per_param.items()}
            for idx, per_param in state["state"].items()
        }
        return {"state": gathered, "param_groups": state["param_groups"]}

    def load_model_state(self, model: torch.nn.Module, state: dict) -> None:
        live = model.state_dict()
        model.load_state_dict({k: _shard_like(state[k], v) for k, v in live.items()})

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        # State is keyed by the parameter's index over the param groups, as in `state_dict()`.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {
            idx: {
                k: _shard_like(v, params[idx]) if torch.is_tensor(v) and v.shape == params[idx].shape else v
                for k, v in per_param.items()
            }
            for idx, per_param in state["state"].items()
        }
        optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A gathered copy on CPU: never an alias of live state (Adam's `step` grows in place)."""
    return full_tensor(t).to("cpu", copy=True)


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: sharded the same way if `like` is a DTensor, else as is."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor  # as FSDP: sharded runs only

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
