"""`RoutingControl`: steer and observe the routers of a transformers MoE model through forward hooks.

Shape legend: L MoE layers (in layer order), T tokens of one router call (the router flattens
any leading shape row-major: token `b·S + s` for a `[B, S]` batch; T = B per decoding step with
a KV cache), E experts, K = top_k.

The hooks sit on each sparse MoE block's router (`block.gate`, a `*TopKRouter` that returns
`(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])`) and may replace its
output. Only hooks are used: no transformers class is patched. Supported: every router whose own
output is softmax top-k (renormalised or not), which `check_routers` verifies by running each
router once at setup: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE (its shared expert is not routed and is
left alone) and the rest listed in docs/families.md. Routers with sigmoid scores, a correction
bias, group-limited top-k or a scaling factor (DeepSeek-V3 and its kin) are refused with one line:
re-routing them by softmax would change the model.

Modes:
- "learned" (default): experts = top-k of `logits + selection_bias[l]` (Stage IV's
  auxiliary-loss-free balancing), weights from the *unbiased* softmax, renormalised when the
  model's config says so (Mixtral always does). With a zero bias this is the HF router exactly,
  except on exactly tied logits: padd picks the lower expert id, `torch.topk` is unspecified
  (e.g. an all-zero router).
- Tied groups (`padd_router_group_size = k` in the model config, from
  `decompress(init="exact")`): selection as in "learned", which always picks one whole group,
  and weights exactly 1/k as constants. The task loss then sends no gradient to the router
  (mathematically it would be zero: a group's k renormalised weights are 1/k for any tied
  logits; numerically it is float noise that Adam would amplify into a random walk). The router
  learns from its own objective on the captured logits, and only the router: its input is
  detached (the logits feed nothing else differentiable), so a router objective cannot bend the
  backbone's hidden states to be easier to route.
- "uniform" (Stage I warmup): frozen round-robin routing that ignores the router: slot j of
  token t goes to expert `(t·K + j) mod E` with weight `1/K`. The router logits still flow out
  (for `L_init` and HF's aux loss) but the routing itself carries no gradient to the router.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from padd.kernels import route

from .router_groups import router_group_size
from .routers import find_moe_routers

__all__ = ["BIAS_FILENAME", "MODES", "RoutingControl", "check_routers", "find_moe_routers"]

BIAS_FILENAME = "padd_router_bias.safetensors"
MODES = ("learned", "uniform")


def check_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`find_moe_routers(model)`, each checked to route as `RoutingControl` re-routes: its own
    output on probe tokens equals softmax top-k of its logits (ids and weights). Raises
    `ValueError` with one line naming the first router that does not."""
    found = find_moe_routers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no transformers MoE router (a block with `gate` and "
            "fused `experts`); supported: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE and docs/families.md"
        )
    for name, router in found:
        _check_softmax_top_k(name, router)
    return found


@torch.no_grad()
def _check_softmax_top_k(name: str, router: nn.Module) -> None:
    weight = router.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(32, weight.shape[1], generator=generator, dtype=torch.float32)
    was_training = router.training
    router.eval()  # Mixtral's jitter noise acts in training mode only
    kind = f"{name} ({type(router).__name__})"
    try:
        out = router(probe.to(device=weight.device, dtype=weight.dtype))
    except Exception as error:  # e.g. a hash router that needs the token ids
        raise ValueError(
            f"RoutingControl steers routers of hidden states; {kind} does not run on them alone "
            f"({type(error).__name__})"
        ) from None
    finally:
        router.train(was_training)
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError(f"RoutingControl steers routers returning (logits, weights, ids); {kind} does not")
    logits, weights, ids = out
    norm = bool(getattr(router, "norm_topk_prob", True))
    ours = route(logits.reshape(-1, weight.shape[0]).float(), int(router.top_k), renormalize=norm)
    theirs_ids, order = ids.reshape(ours.expert_ids.shape).long().sort(dim=-1)
    ours_ids, our_order = ours.expert_ids.long().sort(dim=-1)
    same = torch.equal(theirs_ids, ours_ids) and torch.allclose(
        weights.reshape(order.shape).float().gather(1, order),
        ours.weights.gather(1, our_order),
        rtol=1e-4,
        atol=1e-6,
    )
    if not same:
        raise ValueError(
            f"RoutingControl re-routes by softmax top-k; {kind} routes otherwise (sigmoid scores, a "
            "correction bias, groups or a scaling factor), so steering it would change the model"
        )


class RoutingControl:
    """Forward hooks on every MoE router of a transformers model: selection bias, uniform routing,
    capture of router logits.

    Attributes:
        num_layers: L, the number of MoE layers (dense layers such as Qwen2-MoE's
            `mlp_only_layers` are not counted).
        num_experts: E. top_k: K.
        norm_topk_prob: whether the K weights are renormalised (per config; Mixtral: True).
        selection_bias: fp32 `[L, E]` on the model's device, zeros initially. The trainer
            updates it in place (`control.selection_bias[l] -= ...`); it only changes which
            experts are selected in "learned" mode, never the weights.
        mode: "learned" or "uniform".
        capture: when True, each router call stores its layer's `router_logits [T, E]` (graph
            kept) and the chosen `selected_experts [T, K]` (after bias / uniform routing).
        router_logits, selected_experts: per-layer lists of length L (None until that layer
            ran with `capture` on); they hold the *last* call of each layer.
        routers, layer_names: the hooked router modules and their qualified names.

    Example:
        >>> control = RoutingControl(model)
        >>> with control.capturing():
        ...     model(input_ids)
        >>> probs = control.router_probs()  # L tensors [T, E]
        >>> control.selection_bias[3, 7] += 0.01  # Stage IV update
        >>> control.remove()

    Notes: `mode="uniform"` bypasses the router for the *routing* only; transformers'
    `output_router_logits` aux loss is still computed from the logits and does not see the
    uniform routing. With gradient checkpointing the recomputation in backward re-runs the
    hooks, which overwrites the captured entries with equal values.
    """

    def __init__(self, model: nn.Module, *, mode: str = "learned", capture: bool = False) -> None:
        found = check_routers(model)
        self.layer_names = [name for name, _ in found]
        self.routers = [router for _, router in found]
        first = self.routers[0]
        self.num_layers = len(self.routers)
        self.num_experts = int(first.num_experts)
        self.top_k = int(first.top_k)
        # Mixtral's router has no flag and always renormalises.
        self.norm_topk_prob = bool(getattr(first, "norm_topk_prob", True))
        self.group_size = router_group_size(model)
        if self.group_size > 1 and (self.group_size != self.top_k or self.num_experts % self.group_size):
            raise ValueError(
                f"tied router groups of {self.group_size} need top_k == group size and groups dividing "
                f"the experts; this model has E={self.num_experts}, k={self.top_k}"
            )
        for name, router in found:
            if (router.num_experts, router.top_k) != (self.num_experts, self.top_k):
                raise ValueError(
                    f"{name} has E={router.num_experts}, k={router.top_k}; expected the same "
                    f"E={self.num_experts}, k={self.top_k} in every MoE layer"
                )
        self._selection_bias = torch.zeros(
            self.num_layers, self.num_experts, dtype=torch.float32, device=first.weight.device
        )
        self.mode = mode
        self.capture = capture
        self.router_logits: list[torch.Tensor | None] = []
        self.selected_experts: list[torch.Tensor | None] = []
        self.clear()
        self._handles = [
            router.register_forward_hook(self._make_hook(layer)) for layer, router in enumerate(self.routers)
        ]
        if self.group_size > 1:
            self._handles += [router.register_forward_pre_hook(_detach_input) for router in self.routers]

    # -- state ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @property
    def selection_bias(self) -> torch.Tensor:
        return self._selection_bias

    @selection_bias.setter
    def selection_bias(self, value: torch.Tensor) -> None:
        shape = (self.num_layers, self.num_experts)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"selection_bias must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"selection_bias must have shape [L, E]={shape}, got {tuple(value.shape)}")
        self._selection_bias = value.detach().to(torch.float32, copy=False)

    def clear(self) -> None:
        """Forget the captured logits and experts (lists stay of length L, filled with None)."""
        self.router_logits = [None] * self.num_layers
        self.selected_experts = [None] * self.num_layers

    def router_probs(self) -> list[torch.Tensor | None]:
        """Softmax of each layer's captured logits, fp32 `[T, E]` (graph kept)."""
        return [None if z is None else torch.softmax(z.float(), dim=-1) for z in self.router_logits]

    @contextlib.contextmanager
    def uniform(self) -> Iterator[RoutingControl]:
        """Temporarily route uniformly (Stage I warmup)."""
        previous, self.mode = self.mode, "uniform"
        try:
            yield self
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def capturing(self) -> Iterator[RoutingControl]:
        """Temporarily capture router logits and selections (cleared on entry)."""
        previous, self.capture = self.capture, True
        self.clear()
        try:
            yield self
        finally:
            self.capture = previous

    def remove(self) -> None:
        """Remove every hook; the model routes exactly as transformers does again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingControl:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- persistence ---------------------------------------------------------------------------

    def save_selection_bias(self, directory: str | os.PathLike) -> str:
        """Write the bias to `directory/padd_router_bias.safetensors` (next to a checkpoint).

        Plain `transformers` loading ignores this file, i.e. routes *without* the bias; reload
        it with `load_selection_bias` after building a `RoutingControl` on the loaded model.
        """
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, BIAS_FILENAME)
        metadata = {"num_layers": str(self.num_layers), "num_experts": str(self.num_experts)}
        save_file({"selection_bias": self._selection_bias.detach().cpu().contiguous()}, path, metadata)
        return path

    def load_selection_bias(self, directory: str | os.PathLike) -> torch.Tensor:
        """Read `directory/padd_router_bias.safetensors` into `selection_bias`, in place."""
        path = os.path.join(directory, BIAS_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no selection bias at {path}")
        bias = load_file(path).get("selection_bias")
        shape = (self.num_layers, self.num_experts)
        if bias is None or tuple(bias.shape) != shape:
            found = None if bias is None else tuple(bias.shape)
            raise ValueError(f"{path} holds a selection bias of shape {found}, this model needs {shape}")
        with torch.no_grad():
            self._selection_bias.copy_(bias)
        return self._selection_bias

    # -- the hook ------------------------------------------------------------------------------

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            return self._reroute(layer, output)

        return hook

    def _reroute(self, layer: int, output: tuple) -> tuple:
        logits, hf_weights, hf_experts = output
        logits_TE = logits.reshape(-1, self.num_experts)
        if self._mode == "uniform":
            experts_TK = _round_robin_experts(logits_TE.shape[0], self.top_k, self.num_experts, logits.device)
            weights_TK = torch.full(experts_TK.shape, 1.0 / self.top_k, device=logits.device)
        else:
            routing = route(
                logits_TE,
                self.top_k,
                selection_bias=self._selection_bias[layer].to(logits.device),
                renormalize=self.norm_topk_prob,
            )
            experts_TK, weights_TK = routing.expert_ids, routing.weights
            if self.group_size > 1:  # one whole group at 1/k each: constants (module doc)
                weights_TK = torch.full(experts_TK.shape, 1.0 / self.top_k, device=logits.device)
        # The experts module expects what the HF router returns: int64 ids (one_hot in eager),
        # weights in the router's dtype (fp32 for Mixtral, the logits' dtype elsewhere).
        experts_TK = experts_TK.to(hf_experts.dtype)
        weights_TK = weights_TK.to(hf_weights.dtype)
        if self.capture:
            self.router_logits[layer] = logits_TE
            self.selected_experts[layer] = experts_TK.detach()
        return logits, weights_TK, experts_TK


def _detach_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].detach(), *args[1:])


def _round_robin_experts(num_tokens: int, top_k: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """`[T, K]` int64 with slot j of token t on expert `(t·K + j) mod E`: equal loads when E | T·K."""
    return torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k) % num_experts
