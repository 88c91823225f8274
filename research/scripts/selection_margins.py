"""How far a trained student's Stage IV bias is from changing a routing choice.

Per token of D_D (prompt + worked solution, the first N problems) and per MoE layer: the gap
between the router's k-th and (k+1)-th logit, the margin a selection bias must close to swap an
expert in or out. For a tied-group student the k chosen logits are one group's (equal), so the
gap is to the next group. Printed beside the bias the student ended with (its
`padd_router_bias.safetensors`).

    python research/scripts/selection_margins.py RUN_DIR [MODEL_DIR] [N]

MODEL_DIR defaults to RUN_DIR/train/final, N to 200.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import padd  # noqa: F401  registers experts_implementation="padd"
from padd.data.problem import format_prompt
from padd.moe.routing_control import RoutingControl


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0])
    model_dir = Path(argv[1]) if len(argv) > 1 else run / "train" / "final"
    n = int(argv[2]) if len(argv) > 2 else 200
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="padd").eval()
    rows = [json.loads(line) for line in (run / "data" / "D_D.jsonl").open()][:n]
    enc = tok([format_prompt(r["question"]) + r["answer"] for r in rows], return_tensors="pt", padding=True)
    k = model.config.num_experts_per_tok
    with RoutingControl(model, capture=True) as control, torch.no_grad():
        control.load_selection_bias(model_dir)
        model(**enc)
        keep = enc["attention_mask"].reshape(-1).bool()
        bias = control.selection_bias.abs()
        logits = [z.detach()[keep].float() for z in control.router_logits]
    ranked = [torch.sort(z, dim=-1, descending=True).values for z in logits]
    gap = torch.cat([z[:, k - 1] - z[:, k] for z in ranked])
    reach = float((gap < 2 * bias.max()).float().mean())  # a bias pair can move a gap by 2·max|b|
    print(
        f"{run.name}: margin median {gap.median():.4f}, 10th percentile {gap.quantile(0.1):.4f}; "
        f"|b| mean {bias.mean():.4f}, max {bias.max():.4f}; choices within 2·max|b|: {100 * reach:.2f}%"
    )


if __name__ == "__main__":
    main()
