"""Replays: continue a run from one of its checkpoints with changed settings, as a new run (a
branch), to test a remedy by experiment rather than by correlation.

The branch is a complete run directory: everything the parent recorded up to the checkpoint
(rows, evaluations, grids, events), then training from the checkpoint with the changes, exactly
as a resume would continue it (same data order, same noise). With no changes it reproduces the
parent step for step, so any difference is the changes' doing. ``run.json`` records the parent,
the step and the changes.

What a replay may change is what a resume may (:data:`vaediag.config.RESUME_LOCKED` fixes the
data, the model and the data order): the optimizer (another one starts with fresh state), lr,
eps, betas, clipping, beta and its schedule, free bits, the length of training, ...
"""

from __future__ import annotations

import json
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaediag.config import Config, build_config, from_dict, resume_changes
from vaediag.errors import RunDirError
from vaediag.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_TOML,
    ENVIRONMENT_JSON,
    EVALS_DIR,
    EVENTS_JSONL,
    FIXED_NPZ,
    GRIDS_DIR,
    RUN_JSON,
    SCALARS_DIR,
    atomic_write,
    check_can_create,
    list_checkpoints,
    list_grids,
    load_run,
)


@dataclass
class Branch:
    """A replay about to be trained: where, from which checkpoint, with which config."""

    parent: Path
    path: Path
    step: int  # the checkpoint's step: the branch's rows from here on are its own
    checkpoint: Path
    config: Config
    changes: dict[str, list[Any]]


def checkpoint_at_or_before(run_dir: Path, step: int) -> tuple[int, Path]:
    """The newest checkpoint of ``run_dir`` at or before ``step``."""
    checkpoints = list_checkpoints(run_dir)
    earlier = [(s, p) for s, p in checkpoints if s <= step]
    if not earlier:
        where = (f"its checkpoints are at steps {', '.join(str(s) for s, _ in checkpoints)}"
                 if checkpoints else "it has no checkpoints")
        raise RunDirError(f"{run_dir} has no checkpoint at or before step {step}: {where}")
    return earlier[-1]


def plan(run_dir: str | Path, from_step: int, out: str | Path, *,
         overrides: typing.Sequence[str] = (), values: dict[str, Any] | None = None,
         steps: int | None = None, world: int = 1) -> Branch:
    """Check everything a replay needs and resolve its config; change nothing.

    ``overrides`` are ``--set KEY=VALUE`` texts and ``values`` typed settings by dotted key;
    ``steps``: train this many steps after the checkpoint (default: to the parent's end);
    ``world``: the number of ranks the replay runs on, which must be the parent's (the global
    batch and every rank's random state are the parent's only then).
    """
    parent = Path(run_dir)
    run = load_run(parent)
    if "train" not in run.config:
        raise RunDirError(f"{parent} was not made by 'vaediag train' (no [train] settings in its "
                          f"config): only such runs can be replayed")
    events = run.events
    start = events[events["kind"] == "start"] if len(events) and "kind" in events else events
    trained_on = int(start["world_size"].iloc[0]) if len(start) and "world_size" in start \
        and start["world_size"].notna().iloc[0] else 1
    if trained_on != world:
        how = (f"torchrun --nproc_per_node {trained_on} -m vaediag replay ..."
               if trained_on > 1 else "vaediag replay ... (one process)")
        raise RunDirError(f"{parent} was trained on {trained_on} rank(s) and this replay runs on "
                        f"{world}: replay it as it was trained ({how}), so its global batches "
                        f"and random states are the run's")
    trained = int(run.info.get("step", 0))
    if from_step > trained:
        raise RunDirError(f"{parent} ends at step {trained}: a replay from step {from_step} "
                          f"would start past it; choose a step from 0 to {trained}")
    step, checkpoint = checkpoint_at_or_before(parent, from_step)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise RunDirError(f"{out} exists; choose another --out for the branch")
    check_can_create(out, overwrite=False)
    settings = dict(values or {})
    if steps is not None:
        settings.update({"train.steps": step + steps})
    config = build_config(base=run.config, overrides=overrides, values=settings)
    changes = resume_changes(from_dict(run.config), config, what="a replay")
    return Branch(parent, out, step, checkpoint, config, changes)


def create(branch: Branch) -> None:
    """Write the branch's directory: the parent as it was at the checkpoint, the checkpoint,
    and the parent, step and changes in ``run.json``. Training it is a resume."""
    parent, out, step = branch.parent, branch.path, branch.step
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_TOML, ENVIRONMENT_JSON, FIXED_NPZ, EVENTS_JSONL):
        if (parent / name).exists():
            shutil.copy2(parent / name, out / name)
    for table in (SCALARS_DIR, EVALS_DIR):  # rows after the checkpoint go at the resume
        if (parent / table).is_dir():
            shutil.copytree(parent / table, out / table)
    (out / GRIDS_DIR).mkdir(exist_ok=True)
    for grid_step, path in list_grids(parent):
        if grid_step <= step:
            shutil.copy2(path, out / GRIDS_DIR / path.name)
    (out / CHECKPOINTS_DIR).mkdir(exist_ok=True)
    shutil.copy2(branch.checkpoint, out / CHECKPOINTS_DIR / branch.checkpoint.name)
    info = json.loads((parent / RUN_JSON).read_text(encoding="utf-8"))
    info.update(status="interrupted", step=step, message=f"replay of {parent.name} from step "
                f"{step}", parent={"run": str(parent), "step": step,
                                   "changes": branch.changes})
    atomic_write(out / RUN_JSON, json.dumps(info, indent=2).encode())


def replay(run_dir: str | Path, from_step: int, out: str | Path, *,
           overrides: typing.Sequence[str] = (), values: dict[str, Any] | None = None,
           steps: int | None = None, progress: bool | None = None, quiet: bool = False):
    """Continue ``run_dir`` from its checkpoint at or before ``from_step`` with the changed
    settings, into the new run directory ``out``; returns the trainer's result."""
    from vaediag.monitor.ranks import ProcessGroup
    from vaediag.trainer import train

    ranks = ProcessGroup.join(load_run(run_dir).config.get("train", {}).get("device", "auto"))
    try:
        branch = plan(run_dir, from_step, out, overrides=overrides, values=values,
                      steps=steps, world=ranks.world)
        ranks.barrier()  # every rank checked the branch before rank 0 makes it
        if ranks.rank == 0:
            create(branch)
        ranks.barrier()
        result = train(branch.config, branch.path, resume=True, progress=progress,
                       quiet=quiet)
    except BaseException:
        ranks.leave(clean=False)
        raise
    ranks.leave(clean=True)
    return result


__all__ = ["Branch", "checkpoint_at_or_before", "create", "plan", "replay"]
