"""One gloo process group per world size for the whole test run.

Starting a group costs seconds of CPU per rank (a fresh interpreter, torch, gpu_orthol1 and numba
loaded, the rendezvous), so one spawn per world size runs both sets of cases, in order:
tests/_dist_workers.py's (read by tests/test_distributed.py), then tests/_ddp_workers.py's (read by
tests/test_training.py). conftest.py's `gloo_group` fixture calls run() once per world size; its tests
share the pytest-xdist group "gloo", so that one worker holds the result and the spawn is not repeated.
Each rank writes its own results as it goes and names each case in a .progress file before it runs,
so a hang or a crash names where every rank was.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from . import _ddp_workers, _dist_workers

GROUP_TIMEOUT_S = 300  # a hang fails the tests after this long (each rank's gloo timeout is 90 s)
PARTS = ("dist", "ddp")  # run in this order; each has its own folder of per-rank files


def main(rank, world, init_file, seed, out_dir):
    """A spawned rank: join the group, run both sets of cases, leave."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    done = False
    try:
        _dist_workers.run(rank, world, seed, os.path.join(out_dir, "dist"))
        _ddp_workers.run(rank, world, seed, os.path.join(out_dir, "ddp"))
        done = True
    finally:
        dist.destroy_process_group()
    if done:
        # Leave without the interpreter's teardown: after a run that includes the FSDP2 cases, about one
        # exit in five aborts in a C++ destructor ("terminate called without an active exception", after
        # destroy_process_group returned; seen with torch 2.13 CPU + gloo, not reproducible with fewer
        # cases). Every result is written by now, so the teardown has nothing left to do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _where(out: Path, world: int) -> dict:
    """The last case each rank started (in the later part it reached)."""
    where = {}
    for r in range(world):
        for part in PARTS:
            p = out / part / f"rank{r}.progress"
            if p.exists():
                where[r] = f"{part}: {(p.read_text().splitlines() or ['(none yet)'])[-1]}"
    return where


def _kill(ctx):
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(5)


def run(world: int, out: Path) -> dict:
    """Spawn `world` ranks running main(); wait for them. Returns {"world", "seed", "dist": per-rank
    results, "ddp": per-rank results}. A hang or a dead rank fails the calling test's set-up."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    seed = int(np.random.SeedSequence().entropy) % (1 << 31)
    print(f"gloo group seed = {seed} (world {world})")
    t0 = time.monotonic()
    ctx = mp.start_processes(
        main, args=(world, str(out / "store"), seed, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() - t0 > GROUP_TIMEOUT_S:
                pytest.fail(
                    f"the {world}-rank group did not finish in {GROUP_TIMEOUT_S} s (seed {seed}); "
                    f"last case per rank: {_where(out, world)}"
                )
    except ProcessException as e:  # a rank died (crash, signal): say where each rank was
        pytest.fail(
            f"the {world}-rank group failed (seed {seed}): {e}; last case per rank: {_where(out, world)} "
            "(the ranks' stderr is in this test's captured output)"
        )
    finally:
        _kill(ctx)
    print(f"{world} ranks: {time.monotonic() - t0:.1f} s")
    res = {"world": world, "seed": seed}
    for part in PARTS:
        res[part] = [json.loads((out / part / f"rank{r}.json").read_text()) for r in range(world)]
    return res
