"""FLOPs parity of decompressed students: the design's promise, checked on the CPU in CI.

For each (teacher, N, k): teacher FLOPs/token, student active FLOPs/token, their ratio, and
total parameters of both, analytic and measured with `FlopCounterMode` (they must agree). The
tiny default is decompressed for real; the 1.5B/7B/8B-shaped configs run on the `meta` device
(no weights). Exits with status 1 if a ratio exceeds 1.01 or analytic != measured.

    python benchmarks/bench_flops_parity.py [--seq-len 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from padd import flops
from padd.decompress import decompress
from padd.decompress.architectures import student_config

MAX_RATIO = 1.01


def tiny_llama() -> LlamaConfig:
    """The embedded default teacher: Llama, d = 128, 4 layers, d_ff = 512, vocab 64."""
    return LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def qwen25_math_1_5b() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def qwen25_math_7b() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )


def llama3_8b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )


# (name, teacher config, [(N, k), ...], built for real or on meta)
CASES = [
    ("tiny-llama (default)", tiny_llama, [(8, 2), (16, 4), (8, 1)], "real"),
    ("Qwen2.5-Math-1.5B", qwen25_math_1_5b, [(8, 2), (16, 4), (64, 8)], "meta"),
    ("Qwen2.5-Math-7B", qwen25_math_7b, [(8, 2), (64, 8), (128, 8)], "meta"),
    ("Llama-3-8B", llama3_8b, [(8, 2), (16, 2), (64, 8)], "meta"),
]


def run_case(name, make_config, num_experts, top_k, where, seq_len) -> dict:
    cfg = make_config()
    if where == "real":
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(cfg).eval()
        student = decompress(teacher, num_experts, top_k)
    else:
        teacher = flops.meta_model(cfg)
        student = flops.meta_model(student_config(cfg, num_experts, top_k, cfg.intermediate_size // top_k))
    rep = flops.compare(teacher, student, seq_len=seq_len)
    agree = all(rep[m]["analytic"] == rep[m]["measured"] for m in ("teacher", "student"))
    return {
        "teacher": name,
        "student": type(student).__name__,
        "N": num_experts,
        "k": top_k,
        "device": where,
        "teacher_flops": rep["teacher"]["measured"]["total"],
        "student_flops": rep["student"]["measured"]["total"],
        "router_flops": rep["student"]["measured"]["router"],
        "ratio": rep["ratio"],
        "teacher_params": rep["teacher"]["params"],
        "student_params": rep["student"]["params"],
        "student_active_params": rep["student"]["active_params"],
        "analytic_equals_measured": agree,
    }


def _fmt_table(rows: list[dict], seq_len: int) -> str:
    head = (
        f"FLOPs per token (forward, seq_len={seq_len}), measured with FlopCounterMode (= analytic)\n\n"
        "| teacher | student | N | k | teacher GFLOP/tok | student GFLOP/tok | ratio | router share "
        "| teacher params | student params (active) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        share = r["router_flops"] / r["student_flops"]
        lines.append(
            f"| {r['teacher']} | {r['student']} | {r['N']} | {r['k']} | {r['teacher_flops'] / 1e9:.4f} "
            f"| {r['student_flops'] / 1e9:.4f} | {r['ratio']:.5f} | {share:.3%} "
            f"| {_params(r['teacher_params'])} | {_params(r['student_params'])} "
            f"({_params(r['student_active_params'])}) |"
        )
    return "\n".join(lines)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [
        run_case(name, make, n, k, where, args.seq_len)
        for name, make, choices, where in CASES
        for n, k in choices
    ]
    print(_fmt_table(rows, args.seq_len))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq_len": args.seq_len, "rows": rows}, f, indent=1)
    bad = [r for r in rows if r["ratio"] > MAX_RATIO or not r["analytic_equals_measured"]]
    for r in bad:
        print(
            f"FAIL {r['teacher']} N={r['N']} k={r['k']}: ratio {r['ratio']:.5f}, "
            f"analytic==measured {r['analytic_equals_measured']}",
            file=sys.stderr,
        )
    return 1 if bad else 0


def test_flops_parity() -> None:
    """CI entry: every configuration's student spends at most 1.01x the teacher's FLOPs/token."""
    assert main([]) == 0


if __name__ == "__main__":
    sys.exit(main())
