"""padd.training: PADD's training phase (Stages II–IV in one loop), rewards, baselines, evaluation.

Modules: `rewards` (answer extraction, verifiable rewards), `objectives` (the RL/KD math as free
functions), `rollout` (sampling and the scoring forward), `prompts` (which prompts each step
sees), `metrics` (routing statistics), `evaluation` (pass@1, expert–subdomain NMI), `config`
(`LoopParams`, `PADDConfig` and baseline presets), `trainer` (`PADDTrainer`), `checkpointing`
(atomic files, checkpoint folders, its typed state, RNG, graceful interruption).
"""

from .config import PRESETS, LoopParams, PADDConfig, preset
from .evaluation import evaluate, normalized_mutual_information
from .rewards import answer_reward, extract_answer, format_reward, normalize_number, reward
from .trainer import PADDTrainer, frozen_reference

__all__ = [
    "LoopParams",
    "PADDConfig",
    "PADDTrainer",
    "PRESETS",
    "preset",
    "frozen_reference",
    "answer_reward",
    "evaluate",
    "extract_answer",
    "format_reward",
    "normalize_number",
    "normalized_mutual_information",
    "reward",
]
