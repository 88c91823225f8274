"""On 2 gloo ranks: every rank agrees on whether a pipeline step is done, even when rank 0 finishes
the step before a slower rank has looked at the run directory (rank 1 used to see rank 0's done
marker, skip the step and leave rank 0 alone in the step's barrier)."""

import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from padd.config import load_config
from padd.pipeline import distributed as pdist
from padd.pipeline.run import Pipeline

MICRO = str(Path(__file__).resolve().parent / "fixtures" / "micro.yaml")  # the test-only smoke config


def _worker(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        ctx = pdist.DistContext(rank=rank, world_size=2)
        flags = {
            "main_rank_flag(rank == 0)": pdist.main_rank_flag(rank == 0, ctx),
            "main_rank_flag(rank == 1)": pdist.main_rank_flag(rank == 1, ctx),
            "any_rank(rank == 1)": pdist.any_rank(rank == 1, ctx),
        }
        cfg = load_config(MICRO, [f"run.dir={run_dir}", f"run.cache_dir={run_dir}/cache"])
        pipeline = Pipeline(cfg, ctx=ctx, log=lambda msg: None)
        ran = []
        if rank == 1:
            time.sleep(1.0)  # rank 0 finishes the step and writes its marker before rank 1 looks
        pipeline._step("data", lambda: ran.append("data") or {})
        pipeline._step("stage1", lambda: ran.append("stage1") or {})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"flags": flags, "ran": ran}, f)
        pipeline.close()
    finally:
        pdist.shutdown()


def test_ranks_agree_on_done_steps_and_flags(tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(init, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["flags"] == {
            "main_rank_flag(rank == 0)": True,  # rank 0's value everywhere
            "main_rank_flag(rank == 1)": False,
            "any_rank(rank == 1)": True,
        }
        assert res["ran"] == ["data", "stage1"]  # no rank skipped a step the other ran
    assert (tmp_path / "run" / "done" / "data.json").is_file()
