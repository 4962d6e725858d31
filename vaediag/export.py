"""Export a run where people already look: TensorBoard event files.

``vaediag export RUN_DIR --tensorboard DIR`` writes DIR/<run name>/ (so several runs sit side
by side under one ``tensorboard --logdir DIR``): every per-step column as a scalar under
``train/`` and every per-evaluation column under ``eval/``, at its step and at the wall time the
run recorded it; each evaluation's 4x8 grid as an image under ``grid``; and, where the run has
been analysed, its findings as text. Needs the ``tensorboard`` package (``pip install
'vaediag[tensorboard]'``).
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from vaediag.analysis import FINDINGS_JSON
from vaediag.columns import EPOCH, STEP, TIME
from vaediag.errors import UserError
from vaediag.rundir import CONFIG_TOML, Run, load_run

#: columns that are the axis, not a series
AXIS_COLUMNS = (STEP, TIME, EPOCH)


class _EventWriter:
    """TensorBoard's own event-file writer, with summaries built by torch's helpers."""

    def __init__(self, directory: Path):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            from torch.utils.tensorboard import summary as summaries
        except ImportError:
            raise UserError("export --tensorboard needs the tensorboard package: pip install "
                            "'vaediag[tensorboard]' (or pip install tensorboard)") from None
        self._event, self._summary, self._summaries = event_pb2.Event, summary_pb2.Summary, \
            summaries
        self._file = EventFileWriter(str(directory), max_queue_size=1000, flush_secs=30)

    def scalars(self, step: int, wall: float, values: list[tuple[str, float]]) -> None:
        """Every column of one row in one event: as many events as rows, not values."""
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=value)
                                       for tag, value in values])
        self._file.add_event(self._event(step=step, wall_time=wall, summary=summary))

    def image(self, tag: str, step: int, wall: float, picture: np.ndarray) -> None:
        summary = self._summaries.image(tag, picture, dataformats="HWC")
        self._file.add_event(self._event(step=step, wall_time=wall, summary=summary))

    def text(self, tag: str, step: int, wall: float, text: str) -> None:
        summary = self._summaries.text(tag, text)
        self._file.add_event(self._event(step=step, wall_time=wall, summary=summary))

    def close(self) -> None:
        self._file.close()


def _start_time(run: Run) -> float:
    try:
        return datetime.fromisoformat(str(run.info.get("created"))).timestamp()
    except ValueError:
        return 0.0


def _scalars(writer: _EventWriter, prefix: str, frame: pd.DataFrame, start: float) -> int:
    if frame.empty:
        return 0
    steps = frame[STEP].to_numpy()
    times = frame[TIME].to_numpy(np.float64) + start if TIME in frame.columns else \
        np.full(len(frame), start)
    tags = [(f"{prefix}/{c}", c) for c in frame.columns if c not in AXIS_COLUMNS]
    block = frame[[c for _, c in tags]].to_numpy(np.float64)
    names = [tag for tag, _ in tags]
    count = 0
    for i, (step, wall) in enumerate(zip(steps, times, strict=True)):
        row = [(tag, float(v)) for tag, v in zip(names, block[i], strict=True)
               if math.isfinite(v)]
        if row:
            writer.scalars(int(step), float(wall), row)
            count += len(row)
    return count


def _findings_text(path: Path) -> str | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lines = [f"**verdict**: {payload.get('verdict', '')}" if payload.get("verdict") else ""]
    for f in payload.get("findings", []):
        lines.append(f"- **{f.get('severity', '').upper()}** `{f.get('kind')}` (steps "
                     f"{f.get('first_step')}-{f.get('last_step')}): {f.get('summary', '')}")
    return "\n".join(line for line in lines if line) or "no findings"


def to_tensorboard(run_dir: str | Path, directory: str | Path, *,
                   overwrite: bool = False) -> dict[str, int | str]:
    """Write the run at ``run_dir`` as TensorBoard event files in DIRECTORY/<run name>; returns
    what was written (counts of scalars and images, and the folder)."""
    from PIL import Image

    run = load_run(run_dir)
    target = Path(directory) / run.path.name
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it, or export to "
                            f"another folder")
        shutil.rmtree(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {target}: {exc.strerror or exc}") from None
    start = _start_time(run)
    writer = _EventWriter(target)
    try:
        scalars = _scalars(writer, "train", run.scalars, start)
        scalars += _scalars(writer, "eval", run.evals, start)
        times = dict(zip(run.evals[STEP], run.evals.get("time", []), strict=False)) \
            if len(run.evals) else {}
        images = 0
        for step, path in run.grids:
            with Image.open(path) as im:
                picture = np.asarray(im.convert("RGB"))
            writer.image("grid", step, start + float(times.get(step, 0.0)), picture)
            images += 1
        text = _findings_text(run.path / FINDINGS_JSON)
        if text is not None:
            writer.text("vaediag/findings", int(run.info.get("step", 0)), start, text)
        writer.text("vaediag/config", 0, start, "```\n" + _config_text(run) + "\n```")
    finally:
        writer.close()
    return {"folder": str(target), "scalars": scalars, "images": images}


def _config_text(run: Run) -> str:
    try:
        return (run.path / CONFIG_TOML).read_text(encoding="utf-8")
    except OSError:
        return ""


__all__ = ["to_tensorboard"]
