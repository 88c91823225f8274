"""generate() tokens/s: a Qwen3-MoE model on `experts_implementation="padd"` against transformers' own.

    python -m pytest benchmarks/bench_generate.py -s          (PADD_BENCH_OUT=dir writes JSON)

The model is `Qwen3MoeForCausalLM` with Qwen3-30B-A3B's dimensions (hidden 2048, 32 query / 4 KV
heads of 128, 128 experts of width 768, top-8, vocabulary 151936) but only a few of its 48
layers, random weights, bf16 on GPU. Every layer is an MoE layer, as in the real model. The same
weights run under each experts implementation (switched with `set_experts_implementation`):
  padd                  registered by `import padd` (padd.kernels.moe_ffn)
  transformers default  what `from_pretrained` picks when nothing is asked (grouped_mm where
                        torch has grouped GEMM, else eager); the row names the one it resolved to
  transformers batched_mm   transformers' decode-oriented implementation (when not the default)
Greedy decoding of a fixed number of new tokens (no EOS), batch 1 and 32, one random prompt per
row; tokens/s = batch · new tokens / wall time of the whole `generate()` call (prefill included).
`tokens_match_default` is the fraction of generated tokens equal to the default's: bf16 ties can
flip a token on random weights, so it is a sanity figure, not a test.

On CPU the model is tiny (and fp32), every row is labelled CPU and the JSON's device kind is
"cpu": it checks the suite runs; it is not a GPU result.

Environment (all optional): PADD_BENCH_GEN_LAYERS (GPU 4), PADD_BENCH_GEN_BATCHES ("1,32"),
PADD_BENCH_GEN_PROMPT (GPU 128 tokens), PADD_BENCH_GEN_NEW_TOKENS (GPU 64),
PADD_BENCH_GEN_IMPLS ("padd,default,batched_mm"; "eager" also accepted).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import padd  # noqa: F401  (registers experts_implementation="padd")
from benchmarks.common import (
    bench_device,
    env_list,
    make_record,
    on_gpu,
    report_suite,
    time_fn,
    write_if_requested,
)

SUITE = "generate"
# Qwen/Qwen3-30B-A3B config.json, less its layer count (48).
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)  # fmt: skip
TINY_CPU = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)  # fmt: skip
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
LAYERS = int(os.environ.get("PADD_BENCH_GEN_LAYERS", 4 if on_gpu() else 2))
BATCHES = [int(b) for b in env_list("PADD_BENCH_GEN_BATCHES", "1,32")]
PROMPT = int(os.environ.get("PADD_BENCH_GEN_PROMPT", 128 if on_gpu() else 8))
NEW_TOKENS = int(os.environ.get("PADD_BENCH_GEN_NEW_TOKENS", 64 if on_gpu() else 8))
IMPLS = env_list("PADD_BENCH_GEN_IMPLS", "padd,default,batched_mm")
MODEL_NAME = f"qwen3-30b-a3b-{LAYERS}L" if on_gpu() else f"tiny-qwen3-moe-cpu-{LAYERS}L"
_REPS = {"warmup": 1, "reps": 3} if on_gpu() else {"warmup": 1, "reps": 1}
_RECORDS: list = []
_SKIPPED: list[dict] = []
_DEFAULT: dict[str, str] = {}
_NOTE = {} if on_gpu() else {"note": "CPU smoke run at a tiny shape: not a GPU result"}


@pytest.fixture(scope="module")
def model() -> Qwen3MoeForCausalLM:
    dims = QWEN3_30B_A3B if on_gpu() else TINY_CPU
    config = Qwen3MoeConfig(
        **dims, num_hidden_layers=LAYERS, pad_token_id=0, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(bench_device()):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=DTYPE)
    # Built without asking for one: the config holds transformers' default, resolved.
    _DEFAULT["experts_implementation"] = model.config._experts_implementation
    return model.eval()


def _write() -> None:
    write_if_requested(SUITE, _RECORDS, {"skipped": _SKIPPED, **_NOTE})


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report_suite(SUITE, _RECORDS, _SKIPPED, _NOTE)


def _implementations(model: Qwen3MoeForCausalLM) -> list[tuple[str, str]]:
    """(row name, experts_implementation) in run order; the default resolved the way
    `from_pretrained` resolves it, and batched_mm dropped when it is the default."""
    default = _DEFAULT["experts_implementation"]
    rows = []
    for key in IMPLS:
        if key == "padd":
            rows.append(("padd (experts_implementation=padd)", "padd"))
        elif key == "default":
            rows.append((f"transformers default ({default})", default))
        elif key != default or "default" not in IMPLS:
            rows.append((f"transformers {key}", key))
    return rows


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_generate(model, batch):
    gen = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=gen).to(bench_device())
    mask = torch.ones_like(ids)
    shape = {"model": MODEL_NAME, "batch": batch, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
             "layers": LAYERS, "dtype": str(DTYPE).removeprefix("torch.")}  # fmt: skip
    records, outputs = [], {}
    for name, implementation in _implementations(model):
        try:
            model.set_experts_implementation(implementation)
        except Exception as exc:  # not in this transformers' registry
            print(f"skip {name}: {type(exc).__name__}: {exc}")
            _SKIPPED.append({"impl": name, "batch": batch, "reason": f"{type(exc).__name__}: {exc}"})
            continue

        def run(name=name):
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                )  # fmt: skip
            outputs[name] = out[:, PROMPT:]
            return out

        try:
            timing = time_fn(run, **_REPS)
        except Exception as exc:  # an implementation that fails here: report, do not fail the suite
            reason = f"failed ({type(exc).__name__}: {str(exc)[:300]})"
            print(f"skip {name} batch={batch}: {reason}")
            _SKIPPED.append({"impl": name, "batch": batch, "reason": reason})
            continue
        finally:
            if on_gpu():
                torch.cuda.empty_cache()
        assert outputs[name].shape == (batch, NEW_TOKENS), f"{name} generated {tuple(outputs[name].shape)}"
        tokens_per_s = batch * NEW_TOKENS / (timing["median_ms"] / 1e3)
        record = make_record(
            SUITE, "generate", name, shape, timing, tokens_per_s=tokens_per_s,
            experts_implementation=implementation,
        )  # fmt: skip
        print(f"  {name} batch={batch}: {tokens_per_s:.1f} tokens/s")
        records.append(record)
        _RECORDS.append(record)
        _write()
    default = next((r for r in records if r.impl.startswith("transformers default")), None)
    padd_row = next((r for r in records if r.impl.startswith("padd")), None)
    for r in records:
        if default is not None and r is not default:
            same = (outputs[r.impl] == outputs[default.impl]).float().mean().item()
            r.extra["tokens_match_default"] = same
    if padd_row is not None:
        for r in records:
            if r is not padd_row:
                r.extra["padd_speedup"] = r.median_ms / padd_row.median_ms
        if default is not None:
            speedup = default.median_ms / padd_row.median_ms
            padd_row.extra["speedup_vs_default"] = speedup
            print(f"  batch={batch}: padd generates {speedup:.2f}x the tokens/s of {default.impl}")
    _write()


# -- padd's decode loop against `generate` ------------------------------------------------------

ROLLOUT_PROMPTS = int(os.environ.get("PADD_BENCH_GEN_ROLLOUT_PROMPTS", 32 if on_gpu() else 8))
ROLLOUT_REPEATS = 8
# On CPU, the small preset's rollout shape (prompts of ~80 characters, 32 new tokens).
ROLLOUT_PROMPT = int(os.environ.get("PADD_BENCH_GEN_ROLLOUT_PROMPT", 128 if on_gpu() else 80))
ROLLOUT_NEW_TOKENS = int(os.environ.get("PADD_BENCH_GEN_ROLLOUT_NEW_TOKENS", 64 if on_gpu() else 32))


@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
def test_bench_padd_decode(model, do_sample):
    """`padd.training.decode` (what `rollout.generate` runs) against the `model.generate` call it
    replaced, on `ROLLOUT_PROMPTS` distinct left-padded prompts × 8 rows each (a GRPO rollout's
    layout) on padd's experts; both timed here, the ratio reported, the tokens compared."""
    from padd.training import decode as padd_decode

    model.set_experts_implementation("padd")
    gen = torch.Generator(device="cpu").manual_seed(7)
    P, G = ROLLOUT_PROMPTS, ROLLOUT_REPEATS
    ids = torch.randint(3, model.config.vocab_size, (P, ROLLOUT_PROMPT), generator=gen).to(bench_device())
    mask = torch.ones_like(ids)
    for row in range(0, P, 2):  # every other prompt left-padded by a quarter of its length
        mask[row, : ROLLOUT_PROMPT // 4] = 0
        ids[row, : ROLLOUT_PROMPT // 4] = 0
    kw = dict(do_sample=do_sample, max_new_tokens=ROLLOUT_NEW_TOKENS)
    kw.update(
        dict(temperature=1.0, top_p=1.0, top_k=0)
        if do_sample
        else dict(temperature=None, top_p=None, top_k=None)
    )
    assert padd_decode.supported(model, **kw)
    outputs = {}

    def old():
        torch.manual_seed(0)
        with torch.no_grad():
            outputs["generate"] = model.generate(
                input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                pad_token_id=0, eos_token_id=None, **kw,
            )  # fmt: skip

    def new():
        torch.manual_seed(0)
        outputs["padd"] = padd_decode.decode(
            model, ids, mask, repeats=G, pad_token_id=0, eos_token_id=None, **kw
        )

    shape = {"model": MODEL_NAME, "prompts": P, "repeats": G, "prompt": ROLLOUT_PROMPT,
             "new_tokens": ROLLOUT_NEW_TOKENS, "layers": LAYERS, "dtype": str(DTYPE).removeprefix("torch."),
             "do_sample": do_sample}  # fmt: skip
    timings = {}
    for _ in range(2):  # alternate, so a change in machine load hits both
        for name, fn in (("generate", old), ("padd", new)):
            t = time_fn(fn, warmup=1, reps=3)
            if name not in timings or t["median_ms"] < timings[name]["median_ms"]:
                timings[name] = t
    same = bool(torch.equal(outputs["padd"], outputs["generate"]))
    ratio = timings["generate"]["median_ms"] / timings["padd"]["median_ms"]
    for name in ("generate", "padd"):
        mode = "sample" if do_sample else "greedy"
        record = make_record(SUITE, "rollout_decode", f"{name} ({mode})", shape, timings[name],
                             speedup_vs_generate=ratio, tokens_identical=same)  # fmt: skip
        _RECORDS.append(record)
    print(f"  rollout decode ({shape['do_sample']=}): padd {ratio:.2f}x generate, tokens identical: {same}")
    _write()
    assert same
