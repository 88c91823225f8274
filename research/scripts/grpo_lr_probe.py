"""Plain GRPO on a run's dense teacher at one learning rate: does the sampled accuracy rise?

    python research/scripts/grpo_lr_probe.py CACHE_DIR LR STEPS [METHOD]

CACHE_DIR is a `run.cache_dir` holding the seed-0 tiny teacher. Prints the step metrics
averaged over every 10 steps (reward, sampled accuracy, gradient norm, clip fraction...).
"""

import dataclasses
import sys
import time

import torch

from padd.config import load_config
from padd.pipeline.inputs import RunInputs
from padd.pipeline.methods import training_config
from padd.pipeline.run_dir import RunDir
from padd.training.prompts import prompt_batches
from padd.training.trainer import PADDTrainer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cache, lr, steps = argv[0], float(argv[1]), int(argv[2])
    method = argv[3] if len(argv) > 3 else "vanilla_grpo"
    torch.set_num_threads(1)
    cfg = load_config("tiny", [f"run.cache_dir={cache}", "run.dir=/tmp/grpo_lr_probe"])
    inputs = RunInputs(cfg, RunDir(cfg.run.dir), device=torch.device("cpu"), save_tokenizer=False)
    torch.manual_seed(0)
    pcfg = training_config(method, dataclasses.replace(cfg.training.params, learning_rate=lr), 0)
    trainer = PADDTrainer(inputs.load_teacher(), None, inputs.tokenizer, pcfg, None)
    batches = prompt_batches(inputs.split("C"), cfg.training.prompts_per_step, 0, 0)
    history, t0 = [], time.time()
    for step in range(steps):
        history.append(trainer.step(next(batches)))
        if (step + 1) % 10 == 0:
            window = history[-10:]
            keys = [k for k, v in window[0].items() if isinstance(v, float)]
            means = {k: round(sum(r[k] for r in window) / len(window), 4) for k in keys}
            print(step + 1, means, f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
