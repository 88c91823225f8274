"""Tiny random models of every transformers family whose experts use `@use_experts_implementation`.

A test helper (not a test file). Families are discovered at run time in the INSTALLED transformers,
so one that a new release adds is picked up without editing this file:

- `discover_families()`: every family, as `Family(model_type, config_class, model_class, experts_classes)`;
- `build_tiny_model(family)`: a fresh fp32 model in eval mode (hidden 64, 2 layers, all MoE where the
  family allows, 8 experts, top-2, expert width 32, vocab 128) or `Unbuildable(reason)`;
- `input_ids(model)`: valid, non-special token ids;
- `inflate_expert_weights(model)`: experts weights rescaled so that gate pre-activations reach ~15,
  past the 7-10 clamps of families such as gpt_oss or deepseek_v4;
- `build_report()`: model_type -> "ok" or the reason it cannot be built.

Configs are shrunk from each family's default config by generic rules keyed on config key names
(`_shrink_text`, `_shrink_tower`); the few per-family edits the generic rules cannot make are in
`_FAMILY_OVERRIDES`, each with its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pathlib
import re
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers.models.auto import configuration_auto, modeling_auto

MARKER = "@use_experts_implementation"

HIDDEN = 64
LAYERS = 2
EXPERTS = 8
TOP_K = 2
EXPERT_WIDTH = 32
VOCAB = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
# An optional SwiGLU clamp that a family's config leaves off (None / 0) is switched on at this limit.
SWIGLU_LIMIT = 7.0


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers model family whose experts module is `@use_experts_implementation`."""

    # The built config's model_type (the family's own, except where `discover_families` says).
    model_type: str
    config_class: type
    # Best class for generate(): *ForCausalLM or *ForConditionalGeneration, else the base model.
    model_class: type | None
    # Every decorated experts class of the family's modeling module(s).
    experts_classes: tuple[type, ...]


class Unbuildable(Exception):
    """A family's tiny model cannot be built on the CPU; the message is a one-line reason."""


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------

_GENERATE_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
)


def _is_decorated_experts(cls: Any) -> bool:
    """True for a class whose own `forward` is the dispatcher that the decorator installs."""
    forward = vars(cls).get("forward") if inspect.isclass(cls) else None
    # `functools.wraps` copies the wrapped forward's name onto the dispatcher, but not its code.
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_qualname.startswith("use_experts_implementation.")


def _is_experts_module(module: torch.nn.Module) -> bool:
    """True for an instance of a decorated experts class, or of a subclass of one (ergo)."""
    return any(_is_decorated_experts(cls) for cls in type(module).__mro__)


def _candidate_modules() -> dict[str, list[str]]:
    """Model folder -> its modeling modules whose source has the decorator (found without importing)."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    found: dict[str, list[str]] = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        if MARKER in path.read_text(encoding="utf-8"):
            name = f"transformers.models.{path.parent.name}.{path.stem}"
            found.setdefault(path.parent.name, []).append(name)
    return found


def _sub_config_classes(config_class: type) -> set[type]:
    """Every config class nested, at any depth, under `config_class`."""
    out: set[type] = set()
    stack = list(getattr(config_class, "sub_configs", {}).values())
    while stack:
        cls = stack.pop()
        if inspect.isclass(cls) and cls not in out:
            out.add(cls)
            stack.extend(getattr(cls, "sub_configs", {}).values())
    return out


def _family_model_type(folder: str) -> str | None:
    """The top-level model_type among those whose config lives in `transformers/models/<folder>`."""
    types = [
        mt
        for mt in configuration_auto.CONFIG_MAPPING_NAMES
        if configuration_auto.model_type_to_module_name(mt) == folder
    ]
    if not types:
        return None
    classes = {mt: configuration_auto.CONFIG_MAPPING[mt] for mt in types}
    nested = set().union(*(_sub_config_classes(c) for c in classes.values()))
    top = [mt for mt in types if classes[mt] not in nested]
    return folder if folder in top else sorted(top or types)[0]


def _class_by_name(name: str | None) -> type | None:
    try:
        return getattr(transformers, name) if name else None
    except (AttributeError, ImportError, RuntimeError):
        return None


def _has_forward(cls: type) -> bool:
    return getattr(cls, "forward", None) is not torch.nn.Module.forward


def _generate_class(config_class: type, modules: list[Any]) -> type | None:
    """The *ForCausalLM / *ForConditionalGeneration class built from `config_class`, if any.

    Only classes whose `config_class` is `config_class` itself count (some auto mappings send a
    composite config to a text-only *ForCausalLM of its text sub-config), and only ones with a
    `forward` (qwen3_omni_moe's top-level class only has `generate`).
    """
    model_type = config_class.model_type
    candidates = [_class_by_name(getattr(modeling_auto, m, {}).get(model_type)) for m in _GENERATE_MAPPINGS]
    candidates += [
        cls
        for module in modules
        for name, cls in sorted(vars(module).items())
        if inspect.isclass(cls)
        and cls.__module__ == module.__name__
        and name.endswith(("ForCausalLM", "ForConditionalGeneration"))
    ]
    for cls in candidates:
        if cls is not None and getattr(cls, "config_class", None) is config_class and _has_forward(cls):
            return cls
    return None


def _pick_model(config_class: type, modules: list[Any]) -> tuple[type, type | None]:
    """(config class, model class): the family's generate class, else that of its first sub-config
    (breadth first) that has one, else the family's base model class."""
    queue = [config_class]
    while queue:
        cfg = queue.pop(0)
        cls = _generate_class(cfg, modules)
        if cls is not None:
            return cfg, cls
        queue.extend(c for c in getattr(cfg, "sub_configs", {}).values() if inspect.isclass(c))
    base = _class_by_name(modeling_auto.MODEL_MAPPING_NAMES.get(config_class.model_type))
    return config_class, base if base is not None and _has_forward(base) else None


def discover_families() -> list[Family]:
    """Every family of the installed transformers with `@use_experts_implementation` experts.

    Sorted by model_type. A family is a `transformers/models/<folder>` whose modeling source has the
    decorator; its config is the folder's top-level config. `model_type` is that config's, except
    for a composite config whose top-level class has no forward (qwen3_omni_moe): then the family
    is built from the first sub-config that has a generate class (qwen3_omni_moe_thinker).
    """
    return list(_discover())


@functools.cache
def _discover() -> tuple[Family, ...]:
    families = []
    for folder, module_names in _candidate_modules().items():
        modules = [importlib.import_module(name) for name in module_names]
        experts = tuple(
            cls
            for module in modules
            for _, cls in sorted(vars(module).items())
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and _is_decorated_experts(cls)
        )
        model_type = _family_model_type(folder)
        if not experts or model_type is None:
            continue
        config_class, model_class = _pick_model(configuration_auto.CONFIG_MAPPING[model_type], modules)
        families.append(Family(config_class.model_type, config_class, model_class, experts))
    return tuple(sorted(families, key=lambda f: f.model_type))


# ---------------------------------------------------------------------------------------------
# Config shrinking: generic rules on the default config's dict
# ---------------------------------------------------------------------------------------------

# Key -> tiny value, where the default is a nonzero int (0 switches a feature off: it stays).
_TEXT_INTS: dict[str, int] = {
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "num_attention_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "head_dim": HEAD_DIM,
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": KV_HEADS,
    "swa_head_dim": HEAD_DIM,
    "num_sliding_attention_heads": HEADS,
    "encoder_ffn_dim": EXPERT_WIDTH,
    # multi-head latent attention and sparse-attention indexers
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": HEAD_DIM,
    "qk_rope_head_dim": HEAD_DIM // 2,
    "qk_head_dim": HEAD_DIM + HEAD_DIM // 2,
    "v_head_dim": HEAD_DIM,
    "o_lora_rank": 32,
    "o_groups": 2,
    "index_n_heads": 2,
    "index_num_heads": 2,
    "index_head_dim": HEAD_DIM,
    # linear-attention and state-space mixers
    "linear_num_heads": 2,
    "linear_head_dim": HEAD_DIM,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "mamba_d_head": HEAD_DIM,
    "mamba_head_dim": HEAD_DIM,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_dt_rank": 8,
    "n_groups": 1,
    "mamba_n_groups": 1,
    # assorted auxiliary widths
    "hidden_size_per_layer_input": 16,
    "router_hidden_size": 16,
    "ple_embed_dim": 16,
    "hc_lowrank": 8,
    "loop_gate_rank": 8,
    # routing: 8 experts in 2 groups, 1 group picked, top-2
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    # where MoE layers start and how often they occur: every layer MoE
    "first_k_dense_replace": 0,
    "decoder_sparse_step": 1,
    "moe_layer_start_index": 0,
    "moe_layer_end_index": LAYERS - 1,
    "moe_layer_interval": 1,
    "num_dense_layers": 0,
    "num_dense_blocks": 0,
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    # one attention layer (the last) where attention is interleaved with other mixers (jamba)
    "attn_layer_period": LAYERS,
    "attn_layer_offset": LAYERS - 1,
}
# Keys whose None default still needs a value: the modeling code reads them unguarded.
_TEXT_NONE_INTS: dict[str, int] = {
    "head_dim": HEAD_DIM,
    "n_routed_experts": EXPERTS,
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "top_k_experts": TOP_K,
    "n_shared_experts": 1,
    "moe_intermediate_size": EXPERT_WIDTH,
}
_TEXT_FIXED: dict[str, Any] = {
    "mlp_only_layers": [],
    "enable_moe_block": True,
    "tie_word_embeddings": False,
    "use_mamba_kernels": False,
}
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "depth", "encoder_layers")
# Tower keys that name the language model's hidden size.
_TOWER_TO_TEXT_KEYS = ("text_hidden_size", "out_hidden_size")
# Sub-config keys that hold a language model; any other sub-config is a (vision, audio...) tower.
_TEXT_SUBCONFIG = re.compile(r"text|thinker|talker|language|llm|code_predictor")
_TOKEN_ID_KEY = re.compile(r"(^|_)(token_id|token_index)$")
_MOE_VALUE = re.compile(r"moe|sparse|expert", re.IGNORECASE)
_DENSE_VALUE = re.compile(r"^(mlp|dense|dense_mlp|ffn)$", re.IGNORECASE)
_WIDTH_KEY = re.compile(r"intermediate_size$|ffn_hidden_size$|expert_dim$|^moe_hidden_size$")
_CODE_MROPE_DEFAULT = re.compile(r'rope_parameters\.get\(\s*"mrope_section",\s*\[([\d,\s]+)\]')


def _is_config_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(_is_int(v) for v in value)


def _layer_count(d: dict[str, Any]) -> int | None:
    return next((d[k] for k in _LAYER_COUNT_KEYS if _is_int(d.get(k))), None)


def _expert_count(key: str) -> int:
    """Tiny value for an int key whose name mentions experts: top-k, shared, zero or routed."""
    if re.search(r"per_tok|topk|top_k", key):
        return TOP_K
    if "shared" in key:
        return 1
    if "zero" in key:
        return 2
    return EXPERTS


def _keep_layers(lists: dict[str, list], old_n: int, n: int) -> list[int]:
    """`n` of `old_n` layer indices, greedily covering as many distinct per-layer values as possible."""
    seen: dict[str, set[str]] = {k: set() for k in lists}
    keep: list[int] = []
    for _ in range(n):
        best = max(
            (i for i in range(old_n) if i not in keep),
            key=lambda i: (sum(repr(v[i]) not in seen[k] for k, v in lists.items()), -i),
        )
        keep.append(best)
        for k, v in lists.items():
            seen[k].add(repr(v[best]))
    return sorted(keep)


def _cut_layers(d: dict[str, Any], old_n: int, n: int) -> None:
    """Cut every per-layer structure of `d` from `old_n` to `n` layers, keeping the same layers in all:
    per-layer lists, lists of layer indices, and `per_layer_config` overrides."""
    lists = {k: list(v) for k, v in d.items() if isinstance(v, list | tuple) and len(v) == old_n}
    keep = _keep_layers(lists, old_n, n)
    new_index = {old: new for new, old in enumerate(keep)}
    for key, value in lists.items():
        picked = [value[i] for i in keep]
        if "source" in key and all(_is_int(v) for v in picked):  # per-layer pointers to other layers
            picked = [new_index.get(v, i) for i, v in enumerate(picked)]
        d[key] = type(d[key])(picked)
    for key, value in list(d.items()):
        if key not in lists and re.search(r"layer|index", key) and _is_int_list(value):
            if all(0 <= v < old_n for v in value):
                d[key] = type(value)(new_index[v] for v in value if v in new_index)
    per_layer = d.get("per_layer_config")
    if isinstance(per_layer, dict):
        d["per_layer_config"] = {
            new_index[int(k)]: v for k, v in per_layer.items() if str(k).isdigit() and int(k) in new_index
        }


def _is_dense(layer_type: Any) -> bool:
    return isinstance(layer_type, str) and bool(_DENSE_VALUE.match(layer_type))


def _all_moe(d: dict[str, Any]) -> None:
    """In per-layer type lists that name MoE layers, turn the dense-MLP layers into MoE ones."""
    for key, value in list(d.items()):
        if isinstance(value, list | tuple):
            moe = [v for v in value if isinstance(v, str) and _MOE_VALUE.search(v)]
            if moe:
                d[key] = type(value)(moe[-1] if _is_dense(v) else v for v in value)


def _fit_sections(sections: list[int], total: int) -> list[int]:
    """Rescale rotary sections (`mrope_section`) to sum to `total`; the largest remainders round up."""
    exact = [s * total / sum(sections) for s in sections]
    scaled = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: scaled[i] - exact[i])[: total - sum(scaled)]:
        scaled[i] += 1
    return scaled


def _fit_rope(d: dict[str, Any], old: dict[str, Any]) -> None:
    """Keep the rotary layout consistent with the tiny head dims."""
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    nope, rot = old.get("qk_nope_head_dim"), old.get("qk_rope_head_dim")
    for params in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
        factor = params.get("partial_rotary_factor")
        if _is_int(nope) and _is_int(rot) and factor is not None and abs(factor - rot / (nope + rot)) < 1e-6:
            # MLA: the rotary fraction of the q/k head, stored pre-computed (mistral4)
            params["partial_rotary_factor"] = d["qk_rope_head_dim"] / (
                d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
            )
        sections = params.get("mrope_section")
        if isinstance(sections, list | tuple) and sections:
            factor = params.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
            rotary = d.get("qk_rope_head_dim") or int((d.get("head_dim") or HEAD_DIM) * factor)
            params["mrope_section"] = _fit_sections(list(sections), rotary // 2)


def _tie_mla_head_dims(d: dict[str, Any], old: dict[str, Any]) -> None:
    """MLA families tie a head dim to the rope dim, or to nope + rope (nope may be a per-layer override)."""
    rope = old.get("qk_rope_head_dim")
    if not _is_int(rope):
        return
    overrides = old.get("per_layer_config") if isinstance(old.get("per_layer_config"), dict) else {}
    nopes = {old.get("qk_nope_head_dim")}
    nopes |= {o.get("qk_nope_head_dim") for o in overrides.values() if isinstance(o, dict)}
    for key in ("head_dim", "swa_head_dim"):
        if _is_int(old.get(key)) and old[key] == rope:
            d[key] = d["qk_rope_head_dim"]
        elif _is_int(old.get(key)) and any(_is_int(n) and old[key] == n + rope for n in nopes):
            d[key] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]


def _is_expert_limit(key: str) -> bool:
    """A routed experts' SwiGLU clamp limit (not a shared expert's)."""
    return "swiglu_limit" in key and "share" not in key


def _shrink_value(d: dict[str, Any], key: str, value: Any, layers: int, heads: Any) -> Any:
    """The tiny value of one key of a language-model config dict (`value` if it stays)."""
    if key in _TEXT_FIXED:
        return _TEXT_FIXED[key]
    if value is None and key in _TEXT_NONE_INTS:
        return _TEXT_NONE_INTS[key]
    if _is_expert_limit(key) and not value and not isinstance(value, list):
        # switch an optional clamp on; a plural name takes one limit per layer
        plural = re.search(r"limits$|_list$", key)
        return [SWIGLU_LIMIT] * (_layer_count(d) or layers) if plural else SWIGLU_LIMIT
    if _is_int_list(value) and _WIDTH_KEY.search(key):
        return type(value)([EXPERT_WIDTH] * len(value))  # e.g. one expert width per modality
    if not _is_int(value) or value == 0:
        return value
    if key in _LAYER_COUNT_KEYS:
        return layers
    if key in _TEXT_INTS:
        return _TEXT_INTS[key]
    if key == "num_key_value_heads":
        return 1 if value == 1 else HEADS if value == heads else KV_HEADS
    if _WIDTH_KEY.search(key):
        return EXPERT_WIDTH
    if "expert" in key and "layer" not in key:
        return _expert_count(key)
    if re.search(r"hidden_(size|dim)$", key):  # projector / adapter widths
        return HIDDEN
    return value


def _shrink_text(d: dict[str, Any], layers: int = LAYERS) -> None:
    """Shrink a language-model config dict in place, to `layers` layers, all MoE where possible."""
    old_n, old = _layer_count(d), dict(d)
    for key, value in list(d.items()):
        if not _is_config_dict(value):
            d[key] = _shrink_value(d, key, value, layers, old.get("num_attention_heads"))
    _tie_mla_head_dims(d, old)
    if old_n is not None and old_n != _layer_count(d):
        _cut_layers(d, old_n, _layer_count(d))
    for layer_override in (d.get("per_layer_config") or {}).values():
        if isinstance(layer_override, dict):
            _shrink_text(layer_override)
    _all_moe(d)
    n = _layer_count(d)
    for key, value in list(d.items()):
        if not isinstance(value, list | tuple) or n is None or len(value) != n:
            continue
        if _is_expert_limit(key):
            d[key] = type(value)(v or SWIGLU_LIMIT for v in value)
        elif _is_int_list(value) and "heads" in key:  # per-layer head counts
            kv = "key_value" in key or "kv" in key
            d[key] = type(value)([d.get("num_key_value_heads" if kv else "num_attention_heads")] * n)
    expand = d.get("mamba_expand", d.get("expand"))
    for heads_key, dim_key in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if _is_int(d.get(heads_key)) and _is_int(d.get(dim_key)) and _is_int(expand):
            d[heads_key] = expand * HIDDEN // d[dim_key]  # mamba: heads * head_dim == expand * hidden
    if d.get("mlp_layer_types", ()) is None and n:
        d["mlp_layer_types"] = ["sparse"] * n  # transformers' name for an MoE layer
    _fit_rope(d, old)


def _shrink_tower(d: dict[str, Any], widths: bool, text_hidden: Any) -> None:
    """A vision / audio / ... tower: one layer, and tiny widths too if `widths`.

    Widths equal to the tower's hidden size, or to the language model's (`text_hidden`), follow it.
    """
    for value in d.values():
        if _is_config_dict(value):
            _shrink_tower(value, widths, text_hidden)
    old = dict(d)
    if widths:
        _shrink_text(d, layers=1)
        for key, value in old.items():
            if _is_int(value) and d[key] == value and re.search(r"(dim|size)$", key):
                if value == old.get("hidden_size"):
                    d[key] = d["hidden_size"]
                elif value == text_hidden:
                    d[key] = HIDDEN
    else:
        for key in _LAYER_COUNT_KEYS:
            if _is_int(d.get(key)):
                d[key] = 1
        if _layer_count(old) not in (None, 1):
            _cut_layers(d, _layer_count(old), 1)
    for key in _TOWER_TO_TEXT_KEYS:
        if _is_int(d.get(key)):
            d[key] = HIDDEN


def _shrink(d: dict[str, Any], tower_widths: bool) -> None:
    """Shrink a config dict (a language model, maybe with text and tower sub-configs) in place."""
    text = d.get("text_config")
    text_hidden = (text if _is_config_dict(text) else d).get("hidden_size")
    for key, value in d.items():
        if _is_config_dict(value):
            if _TEXT_SUBCONFIG.search(key):
                _shrink(value, tower_widths)
            else:
                _shrink_tower(value, tower_widths, text_hidden)
    _shrink_text(d)


def _remap_token_ids(d: dict[str, Any], mapping: dict[int, int]) -> None:
    """pad/bos/eos -> 0/1/2; every other special token id -> a distinct id at the top of the vocab."""
    fixed = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    for key, value in list(d.items()):
        if _is_config_dict(value):
            _remap_token_ids(value, mapping)
        elif key in fixed:
            d[key] = [fixed[key]] if isinstance(value, list) else fixed[key]
        elif _TOKEN_ID_KEY.search(key) and _is_int(value):
            d[key] = mapping.setdefault(value, VOCAB - 1 - len(mapping))


def _add_code_mrope(d: dict[str, Any], family: Family) -> None:
    """Write into the config the `mrope_section` that the modeling code defaults to when it is absent.

    Multimodal-RoPE modeling code reads `rope_parameters.get("mrope_section", [...])`, sized for the
    real head dim; made explicit, `_fit_rope` rescales it to the tiny one.
    """
    sources = (inspect.getsource(inspect.getmodule(cls)) for cls in family.experts_classes)
    match = next((m for m in map(_CODE_MROPE_DEFAULT.search, sources) if m), None)
    if match is None:
        return
    sections = [int(v) for v in match.group(1).split(",") if v.strip()]
    for sub in [d, *(v for k, v in d.items() if _is_config_dict(v) and _TEXT_SUBCONFIG.search(k))]:
        rope = sub.get("rope_parameters")
        if isinstance(rope, dict) and "mrope_section" not in rope:
            rope["mrope_section"] = list(sections)


# model_type -> in-place edit of the shrunk config dict, for what the generic rules cannot do
# (applied before special token ids are moved into the tiny vocab).
_FAMILY_OVERRIDES: dict[str, Callable[[dict[str, Any]], Any]] = {
    # The default schedule is all Mamba; with no attention layer the cache cannot build a mask.
    "granitemoehybrid": lambda d: d.update(layer_types=["linear_attention", "full_attention"]),
    # Up soft cap 25 -> 6: inflated up pre-activations (~10-15) then saturate it too, as they
    # do the gate's (4), so a wrong up cap would show (the caps are read from the module).
    "inkling2": lambda d: d["text_config"].update(mlp_up_softcap=6.0),
    "inkling2_loop": lambda d: d["text_config"].update(mlp_up_softcap=6.0),
    # The vision scale plan follows depth and patch size (the default one needs a 614400^2 Linear).
    "inkling_mm_model": lambda d: d["vision_config"].update(patch_size=4, n_layers=3),
    # The config has no default layer schedule ("conv" / "full_attention"): checkpoints set it.
    "lfm2_moe": lambda d: d.update(layer_types=["conv", "full_attention"]),
    # generate() reads `vision_start_token_id`, which the thinker config class lacks (the composite
    # config holds it, as the talker's): the talker's default.
    "qwen3_omni_moe_thinker": lambda d: d.update(vision_start_token_id=151652),
    # The QSA indexer sizes have no defaults, and the indexer needs exactly one kv head.
    "qwen4_exp": lambda d: d["text_config"].update(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=HEAD_DIM,
        indexer_budget=4,
        indexer_compress_ratio=2,
    ),
    # The text model always builds a sliding-window mask, but the window defaults to None.
    "step3p7": lambda d: d["text_config"].update(sliding_window=4),
    # The config validation accepts top-1 routing only.
    "zaya": lambda d: d.update(num_experts_per_tok=1),
}


def tiny_config(family: Family, tower_widths: bool = True) -> Any:
    """The tiny config of `family` (see `build_tiny_model`).

    With `tower_widths=False`, vision / audio towers keep their widths (only their depth is cut).
    """
    d = family.config_class().to_dict()
    _add_code_mrope(d, family)
    _shrink(d, tower_widths)
    override = _FAMILY_OVERRIDES.get(family.model_type)
    if override is not None:
        override(d)
    _remap_token_ids(d, {})
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype"):
        d.pop(key, None)
    return family.config_class(**d)


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def _instantiate(family: Family, config: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = family.model_class._from_config(config, dtype=torch.float32, experts_implementation="eager")
    return model.eval()


def build_tiny_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised fp32 tiny model of `family`, in eval mode, experts on "eager".

    Hidden size 64, 2 layers (every layer MoE where the family allows; nemotron_h keeps its
    4-entry block list with both MLP blocks MoE), 8 routed experts, top-2 (zaya: top-1), expert
    width 32, vocab 128, 4 heads of 16, pad/bos/eos = 0/1/2, other special ids at the top of the
    vocab, untied embeddings, optional SwiGLU clamps on at 7, vision / audio towers with one layer
    and tiny widths. Raises `Unbuildable` with a one-line reason when that cannot be done on the
    CPU; any other error is a gap in the shrinking rules and propagates.
    """
    if family.model_class is None:
        raise Unbuildable("transformers has no model class with a forward for this config")
    try:
        model = _instantiate(family, tiny_config(family), seed)
    except Exception as error:  # a tower whose widths do not shrink generically keeps them
        try:
            model = _instantiate(family, tiny_config(family, tower_widths=False), seed)
        except Exception:
            raise error from None
    if not any(isinstance(m, family.experts_classes) for m in model.modules()):
        raise Unbuildable("the tiny model has no experts module")
    return model


def _special_ids(d: dict[str, Any]) -> set[int]:
    """Every int special token id (`*_token_id`, `*_token_index`) in a config dict and its sub-configs."""
    out: set[int] = set()
    for key, value in d.items():
        if _is_config_dict(value):
            out |= _special_ids(value)
        elif _TOKEN_ID_KEY.search(key):
            out |= {v for v in (value if isinstance(value, list) else [value]) if _is_int(v)}
    return out


def input_ids(model: torch.nn.Module, batch: int = 2, seq: int = 6, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape (batch, seq) inside the model's vocab, avoiding every special id."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    special = _special_ids(model.config.to_dict())
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, seq), generator=generator)]


def build_report() -> dict[str, str]:
    """model_type -> "ok", or the `Unbuildable` reason, for every discovered family."""
    report = {}
    for family in discover_families():
        try:
            build_tiny_model(family)
            report[family.model_type] = "ok"
        except Unbuildable as e:
            report[family.model_type] = str(e)
    return report


# ---------------------------------------------------------------------------------------------
# Expert pre-activations
# ---------------------------------------------------------------------------------------------


def _up_projection(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the experts' first projection: gate_up_proj, or up_proj when ungated."""
    gated = getattr(module, "has_gate", True) and hasattr(module, "gate_up_proj")
    name = "gate_up_proj" if gated else "up_proj"
    bias = getattr(module, f"{name}_bias", None)
    return getattr(module, name), bias if isinstance(bias, torch.Tensor) else None


def routed_preactivations(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, gate_only: bool = False
) -> torch.Tensor:
    """Pre-activations of an experts module's routed (token, expert) pairs, in fp32.

    `hidden_states` and `top_k_index` are the first two arguments of the experts module's forward.
    Returns one row per routed pair: the first projection's output (gate and up, or up alone when
    the experts are ungated), before any activation or clamp; with `gate_only`, just the gate part
    (the first half, or the even columns of an interleaved gate_up_proj).
    """
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
    index = top_k_index.reshape(x.shape[0], -1)
    weight, bias = _up_projection(module)
    rows = [x.new_zeros(0, weight.shape[-1] if module.is_transposed else weight.shape[-2])]
    for expert in index.unique().tolist():
        if not 0 <= expert < weight.shape[0]:  # an expert-parallel sentinel or a zero expert
            continue
        w = weight[expert].float()
        tokens = x[(index == expert).any(-1)]
        y = tokens @ w if module.is_transposed else torch.nn.functional.linear(tokens, w)
        rows.append(y if bias is None else y + bias[expert].float())
    out = torch.cat(rows)
    if gate_only and getattr(module, "has_gate", True):
        out = out[:, : out.shape[1] // 2] if getattr(module, "is_concatenated", True) else out[:, 0::2]
    return out


def _hidden_and_index(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """(hidden_states, top_k_index) of an experts module call, whatever the parameters are named."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    return values[0], values[1]


def inflate_expert_weights(
    model: torch.nn.Module, scale: float = 15.0, ids: torch.Tensor | None = None
) -> None:
    """Rescale every experts module's 3-D weights in place so its gate pre-activations reach `scale`.

    Each experts module's first projection (gate_up_proj, or up_proj, and its bias) is multiplied
    by the factor that makes the largest |gate pre-activation| (`routed_preactivations`) of its
    routed (token, expert) pairs, on the model's own hidden states for `ids` (default
    `input_ids(model)`), equal to `scale`; the up half scales alike and lands near it. down_proj
    (and its bias) is divided by the same factor, so the model's output stays moderate and finite.
    The default 15 puts about a tenth of the gate entries past the 7-10 clamps of families such as
    gpt_oss, deepseek_v4 or step3p7. Module attributes (clamp limits...) are left alone.
    Deterministic: the factors are measured in one seeded forward pass (the global RNG state is
    left as it was), each module right before it runs, so on inputs that already reflect the
    inflated earlier layers; a module that sees no token gets the geometric mean of the others'.
    """
    modules = [m for m in model.modules() if _is_experts_module(m)]
    if not modules:
        raise ValueError("the model has no @use_experts_implementation experts module")
    factors: dict[torch.nn.Module, float] = {}

    def rescale(module: torch.nn.Module, factor: float) -> None:
        weight, bias = _up_projection(module)
        weight.mul_(factor)
        if bias is not None:
            bias.mul_(factor)
        module.down_proj.div_(factor)
        down_bias = getattr(module, "down_proj_bias", None)
        if isinstance(down_bias, torch.Tensor):
            down_bias.div_(factor)
        factors[module] = factor

    def calibrate(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module in factors:  # a module run several times (looped layers) is calibrated once
            return
        gate = routed_preactivations(module, *_hidden_and_index(module, args, kwargs), gate_only=True)
        if gate.numel() and gate.abs().max() > 0:
            rescale(module, scale / float(gate.abs().max()))

    hooks = [m.register_forward_pre_hook(calibrate, with_kwargs=True) for m in modules]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        # seeded: some forwards draw random numbers (diffusion_gemma noises its canvas)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            model(input_ids=input_ids(model) if ids is None else ids)
            if not factors:
                raise RuntimeError("no experts module received a token")
            mean = float(torch.tensor(list(factors.values())).log().mean().exp())
            for module in modules:
                if module not in factors:
                    rescale(module, mean)
    finally:
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------------------------------------
# Routing knobs
# ---------------------------------------------------------------------------------------------

# Selection-only biases and routing scales, under the names transformers' MoE blocks give them.
CORRECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
ROUTING_SCALE_NAMES = ("routed_scaling_factor", "router_scaling_factor", "route_scale")


def randomize_routing_knobs(block: torch.nn.Module, seed: int = 0) -> list[str]:
    """Make a sparse MoE block's routing knobs act, in place; returns what was changed.

    A fresh model holds zero correction biases, zero router biases and often a routing scale of
    1.0, under which a router that ignores them, or adds them in the wrong place, still looks
    right. This draws every correction bias (on the block, its `gate` / `router`, or a child of
    the router such as Ernie-4.5's `moe_statics`) from N(0, 0.1²), every `[E]` bias of the
    router's linear layer from N(0, 0.5²), and sets each routing scale that is exactly 1.0 to 1.5.
    """
    generator = torch.Generator().manual_seed(seed)
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    changed = []
    owners = [block] + ([router, *router.children()] if isinstance(router, torch.nn.Module) else [])
    with torch.no_grad():
        for owner in owners:
            for name in CORRECTION_BIAS_NAMES:
                bias = getattr(owner, name, None)
                if isinstance(bias, torch.Tensor) and bias.is_floating_point() and bias.numel() > 1:
                    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
                    changed.append(f"{type(owner).__name__}.{name}")
            linear_bias = getattr(owner, "bias", None)
            if owner is not block and isinstance(linear_bias, torch.nn.Parameter) and linear_bias.numel() > 1:
                linear_bias.copy_(torch.randn(linear_bias.shape, generator=generator) * 0.5)
                changed.append(f"{type(owner).__name__}.bias")
            for name in ROUTING_SCALE_NAMES:
                if getattr(owner, name, None) == 1.0 and not isinstance(getattr(owner, name), bool):
                    setattr(owner, name, 1.5)
                    changed.append(f"{type(owner).__name__}.{name}")
    return changed


def randomize_block_norms(block: torch.nn.Module, seed: int = 0) -> list[str]:
    """Draw the weights of a sparse MoE block's own norms (children other than its router,
    experts and shared experts whose every parameter is 1-D, as A.X-K1's `post_mlp_layernorm`)
    from 1 + N(0, 0.3²), in place; returns their names. A fresh norm's weight of ones would let
    a conversion that applies it with the wrong scale, or twice, pass."""
    generator = torch.Generator().manual_seed(seed)
    skip = {
        "gate",
        "router",
        "experts",
        "shared_experts",
        "shared_expert",
        "shared_mlp",
        "shared_expert_gate",
    }
    changed = []
    with torch.no_grad():
        for name, child in block.named_children():
            params = list(child.parameters())
            if name in skip or not params or any(p.dim() != 1 for p in params):
                continue
            for p in params:
                if p.is_floating_point():
                    p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.3)
            changed.append(name)
    return changed
