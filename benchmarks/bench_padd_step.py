"""The PADD step on padd's experts against transformers' default experts, and against the
MoE-vanilla-GRPO step, in the same run, on the same models.

    python benchmarks/bench_padd_step.py [--steps 6] [--prompts 8] [--generations 8] [--new-tokens 48]
    python -m pytest benchmarks/bench_padd_step.py -s      (PADD_BENCH_OUT=dir writes JSON)

Three `PADDTrainer`s run on copies of one student, interleaved step by step so a change in
machine load hits all alike:
- `padd`: preset `padd`, experts on `experts_implementation="padd"` (what `padd train` runs);
- `padd@<default>`: the same on transformers' default experts implementation (`grouped_mm`
  where it can dispatch), the peer for padd's kernels (on CPU: padd's PyTorch reference);
- `vanilla_grpo`: preset `vanilla_grpo` on padd's experts, the peer for PADD's overhead. The student is the
project's embedded default shape (4 layers, hidden 128, FFN 512 → 8 experts of 256, top-2,
character vocabulary); the teacher is the dense Llama it would be decompressed from. EOS is
suppressed in sampling so both methods generate the same number of tokens.

Reported: median step time of each, PADD's overhead in % (target ≤ +15%; the paper reports
+20–32%) as the ratio of medians, as the median of interleaved per-step ratios, and as the
added work alone (teacher scoring + the update's difference; generation is identical work), and
the split into generation, teacher scoring and update. On CPU these are CPU
figures (labelled so), not GPU results.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import Record, device_info, write_results  # noqa: E402
from padd.data.problem import Problem  # noqa: E402
from padd.moe.hf_experts import use_experts  # noqa: E402
from padd.training.config import preset  # noqa: E402
from padd.training.trainer import PADDTrainer  # noqa: E402

SUITE = "padd_step"
SPLIT = ("time_generation", "time_reward", "time_teacher", "time_update", "time_step")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(set("0123456789 +-*/=#.?:QA\n$abcdefghijklmnopqrstuvwxyz")):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _models(vocab_size: int, device: torch.device):
    common = dict(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=512)).to(device).eval()
    student = MixtralForCausalLM(
        MixtralConfig(**common, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)
    ).to(device)
    student.generation_config.suppress_tokens = [1]  # fixed-length rollouts for both methods
    return teacher, student.eval()


def _problems(n: int) -> list[Problem]:
    return [Problem(f"{a}+{2 * a + 1}?", "", str(3 * a + 1), "add") for a in range(11, 11 + n)]


def _on(student, implementation: str):
    return use_experts(copy.deepcopy(student), implementation)


def run(steps: int = 6, prompts: int = 8, generations: int = 8, new_tokens: int = 48) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = _tokenizer()
    teacher, student = _models(len(tok), device)
    default = student.config._experts_implementation  # transformers' choice on this device
    problems = _problems(prompts)
    common = dict(num_generations=generations, max_new_tokens=new_tokens, learning_rate=1e-4, seed=0)
    trainers = {
        "vanilla_grpo": PADDTrainer(_on(student, "padd"), None, tok, preset("vanilla_grpo", **common)),
        "padd": PADDTrainer(_on(student, "padd"), teacher, tok, preset("padd", **common)),
        f"padd@{default}": PADDTrainer(_on(student, default), teacher, tok, preset("padd", **common)),
    }
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in SPLIT} for name in trainers}
    for step in range(steps + 1):  # step 0 warms up (allocations, first-call overheads)
        for name, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            m = trainer.step(problems)
            if step > 0:
                for k in SPLIT:
                    times[name][k].append(m.get(k, 0.0))
    med = {name: {k: statistics.median(v) for k, v in split.items()} for name, split in times.items()}
    base, padd = med["vanilla_grpo"]["time_step"], med["padd"]["time_step"]
    # Steps are interleaved in pairs, so the per-pair ratio cancels slow drifts in machine load.
    pairs = zip(times["padd"]["time_step"], times["vanilla_grpo"]["time_step"], strict=True)
    # The work PADD adds: teacher scoring, and KD/drift/bias inside the update. Generation is the
    # same work for both (same shapes, same token count), so its difference is measurement noise.
    added = med["padd"]["time_teacher"] + med["padd"]["time_update"] - med["vanilla_grpo"]["time_update"]
    peer = med[f"padd@{default}"]["time_step"]
    kernel_pairs = zip(times["padd"]["time_step"], times[f"padd@{default}"]["time_step"], strict=True)
    return {
        "median_s": med,
        "default_experts": default,
        "padd_vs_default_ratio": padd / peer,
        "padd_vs_default_paired_ratio": statistics.median(p / d for p, d in kernel_pairs),
        "overhead_pct": 100.0 * (padd - base) / base,
        "paired_overhead_pct": 100.0 * (statistics.median(p / v for p, v in pairs) - 1.0),
        "added_work_pct": 100.0 * added / base,
        "shape": dict(prompts=prompts, generations=generations, new_tokens=new_tokens, steps=steps),
        "threads": torch.get_num_threads(),
    }


def report(result: dict) -> list[Record]:
    kind = device_info()["kind"].upper()
    med = result["median_s"]
    print(f"[{kind}] PADD step vs MoE-vanilla-GRPO step, {result['shape']}, {result['threads']} threads")
    print(f"{'trainer':<20}" + "".join(f"{k[5:]:>12}" for k in SPLIT) + "   (median seconds)")
    for name, split in med.items():
        print(f"{name:<20}" + "".join(f"{split[k]:12.4f}" for k in SPLIT))
    diff = {k: med["padd"][k] - med["vanilla_grpo"][k] for k in SPLIT}
    print(f"{'padd - vanilla':<20}" + "".join(f"{diff[k]:12.4f}" for k in SPLIT))
    print(
        f"[{kind}] PADD step on padd's experts / on transformers' {result['default_experts']!r}: "
        f"{result['padd_vs_default_ratio']:.3f} (ratio of medians), "
        f"{result['padd_vs_default_paired_ratio']:.3f} (median of interleaved pairs); <= 1: as fast"
    )
    print(
        f"[{kind}] PADD overhead over MoE-vanilla-GRPO: {result['overhead_pct']:+.1f}% (ratio of medians), "
        f"{result['paired_overhead_pct']:+.1f}% (median of interleaved pairs), "
        f"{result['added_work_pct']:+.1f}% (teacher + update difference only); target <= +15%"
    )
    return [
        Record(
            SUITE,
            "train_step",
            name,
            result["shape"],
            1e3 * split["time_step"],
            float("nan"),
            float("nan"),
            extra={
                "split_s": split,
                "overhead_pct": result["overhead_pct"],
                "padd_vs_default_ratio": result["padd_vs_default_ratio"],
                "padd_vs_default_paired_ratio": result["padd_vs_default_paired_ratio"],
                "default_experts": result["default_experts"],
            },
        )  # fmt: skip
        for name, split in med.items()
    ]


def test_bench_padd_step():
    previous = torch.get_num_threads()
    if not torch.cuda.is_available():  # a shared CPU: oversubscribed threads make timings noise
        torch.set_num_threads(1)
    try:
        records = report(run(steps=4))
    finally:
        torch.set_num_threads(previous)
    write_results(SUITE, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--json", action="store_true", help="write the results JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = report(run(args.steps, args.prompts, args.generations, args.new_tokens))
    if args.json:
        print(write_results(SUITE, records))


if __name__ == "__main__":
    main()
