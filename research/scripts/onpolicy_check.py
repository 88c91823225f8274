"""Are GRPO's ratios on-policy? Compare the log-probabilities `generate` sampled with against the
update's forward over the same left-padded sequences (the dense tiny teacher, seed 0).

    python research/scripts/onpolicy_check.py CACHE_DIR
"""

import sys

import torch

from padd.config import load_config
from padd.data.problem import format_prompt
from padd.pipeline.inputs import RunInputs
from padd.pipeline.run_dir import RunDir
from padd.training.rollout import forward_with_routing, response_mask, response_slice, token_logprobs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config("tiny", [f"run.cache_dir={argv[0]}", "run.dir=/tmp/onpolicy_check"])
    inputs = RunInputs(cfg, RunDir(cfg.run.dir), device=torch.device("cpu"), save_tokenizer=False)
    model, tok = inputs.load_teacher(), inputs.tokenizer
    torch.manual_seed(0)
    enc = tok(
        [format_prompt(p.question) for p in inputs.split("C")[:8]],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    ids, attn = enc["input_ids"].repeat_interleave(4, 0), enc["attention_mask"].repeat_interleave(4, 0)
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=32,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    P, resp = ids.shape[1], out.sequences[:, ids.shape[1] :]
    at_generation = torch.stack([torch.log_softmax(z.float(), -1) for z in out.logits], 1)
    at_generation = at_generation.gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    mask = response_mask(resp, [tok.eos_token_id])
    with torch.no_grad():
        full_mask = torch.cat([attn, mask.long()], 1)
        hidden, _, _ = forward_with_routing(model, out.sequences, full_mask, None, moe=False)
        in_update = token_logprobs(model.get_output_embeddings()(response_slice(hidden, P)), resp)
    diff = (at_generation - in_update).abs() * mask
    print(f"max |logp(generate) - logp(update forward)| = {float(diff.max()):.2e}")


if __name__ == "__main__":
    main()
