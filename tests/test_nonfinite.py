"""A non-finite loss never reaches the weights: the update is dropped and counted, in Stages II–IV
and in the Stage I warmup; the next finite update trains as usual."""

import pytest
import torch
from test_router_targets import _problems, _sft_batch
from test_trainer import char_tokenizer, small_config, tiny_student, tiny_teacher

from padd.decompress import decompress, fit_sequence_targets, warmup
from padd.training.trainer import PADDTrainer

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_drops_a_nan_update_and_counts_it(monkeypatch):
    trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(num_iterations=2))
    before = _state(trainer.student)
    bias_before = trainer.control.selection_bias.clone()
    real_kd = trainer._kd_term
    monkeypatch.setattr(trainer, "_kd_term", lambda *a: real_kd(*a) * float("nan"))
    m = trainer.step(_problems(4))
    assert m["skipped_updates"] == 2 and trainer.skipped_updates == 2
    after = _state(trainer.student)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved
    assert torch.equal(trainer.control.selection_bias, bias_before)  # Stage IV skipped too
    assert not trainer.optimizer.state  # Adam's moments never saw a NaN
    monkeypatch.setattr(trainer, "_kd_term", real_kd)
    m = trainer.step(_problems(4))
    assert m["skipped_updates"] == 0
    assert any(not torch.equal(before[k], v) for k, v in _state(trainer.student).items())
    assert all(torch.isfinite(v).all() for v in _state(trainer.student).values())


def test_warmup_drops_a_nan_update(monkeypatch):
    import sys

    warmup_module = sys.modules["padd.decompress.warmup"]  # the package's `warmup` is the function

    tok = char_tokenizer()
    teacher = tiny_teacher()
    batches = [_sft_batch(_problems(8), tok)]
    targets = fit_sequence_targets(teacher, batches, num_groups=2, group_size=2)
    student = decompress(teacher, 4, 2, init="exact")
    before = _state(student)
    real_kd, calls = warmup_module.kd_loss, []

    def nan_on_first_step(*args, **kwargs):  # the first step's L_KD is NaN, later ones are real
        calls.append(1)
        out = real_kd(*args, **kwargs)
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setattr(warmup_module, "kd_loss", nan_on_first_step)
    history = warmup(student, teacher, batches, None, steps=2, lr=1e-3, router_targets=targets)
    assert [h["skipped"] for h in history] == [True, False]
    after = _state(student)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the second step trained
    assert all(torch.isfinite(v).all() for v in after.values())
