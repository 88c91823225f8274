"""β > 0 under FSDP2 on 2 gloo ranks: the reference policy is copied before sharding, sharded like
the student, gathered into the checkpoint and scattered back on resume. Oracle: the initial
student, unsharded, in a single process."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import PROBLEMS, char_tokenizer, small_config, tiny_student

from padd.moe.routing_control import RoutingControl
from padd.pipeline.distributed import ShardedStateIO, apply_fsdp2, shutdown
from padd.training.trainer import PADDTrainer, frozen_reference

IDS = torch.tensor([[3, 9, 14, 22, 5, 31, 7], [12, 4, 4, 18, 27, 6, 10]])


def _train_save_resume(rank: int, ckpt_dir: str, out_file: str) -> None:
    student = tiny_student()
    control = RoutingControl(student)
    reference = apply_fsdp2(frozen_reference(student))
    apply_fsdp2(student)
    trainer = PADDTrainer(
        student,
        None,
        char_tokenizer(),
        small_config("no_stage2", beta=0.1),
        control,
        reference=reference,
        state_io=ShardedStateIO(),
    )
    trainer.step(PROBLEMS[:2])
    with torch.no_grad():
        ref_logits = trainer.reference(input_ids=IDS).logits
        student_logits = trainer.student(input_ids=IDS).logits
    checkpoint = trainer.gather_checkpoint()  # a collective: every rank
    if rank == 0:
        trainer.write_checkpoint(ckpt_dir, checkpoint)
    dist.barrier()
    with torch.no_grad():  # move every rank's shard of the reference away from the saved one
        for p in trainer.reference.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(ckpt_dir)
    with torch.no_grad():
        resumed_logits = trainer.reference(input_ids=IDS).logits
    if rank == 0:
        torch.save(
            {
                "student_logits": student_logits,
                "ref_logits": ref_logits,
                "resumed_logits": resumed_logits,
                "saved_reference": checkpoint.state.reference,
            },
            out_file,
        )


def _worker(rank: int, init_file: str, ckpt_dir: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _train_save_resume(rank, ckpt_dir, out_file)
    finally:
        shutdown()


def test_sharded_reference_is_the_initial_student_and_survives_a_resume(tmp_path):
    out, ckpt = tmp_path / "result.pt", tmp_path / "ckpt"
    init = tempfile.mktemp(dir=tmp_path)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(init, str(ckpt), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)

    oracle = tiny_student()  # the same initial weights, never sharded nor trained
    with torch.no_grad():
        expected = oracle(input_ids=IDS).logits
    torch.testing.assert_close(result["ref_logits"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["resumed_logits"], expected, rtol=1e-5, atol=1e-6)
    saved = result["saved_reference"]
    assert set(saved) == set(oracle.state_dict())
    for name, value in oracle.state_dict().items():
        assert torch.equal(saved[name], value), name  # gathered full tensors, not shards
    assert not torch.allclose(result["student_logits"], expected)  # the step moved the student only
