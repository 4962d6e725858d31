"""THE run-directory format: the one writer and the one reader. Documented in docs/run-format.md.

Layout::

    RUN_DIR/
      run.json          format version, status, last step, timestamps (rewritten atomically)
      config.toml       the resolved configuration
      environment.json  versions, device, seeds, git revision where known
      fixed.npz         the grid's validation images, fixed z (and toyfaces factors)
      events.jsonl      one JSON object per line: non-finite values, checkpoints, resumes, ...
      scalars/          per-step scalars: Arrow IPC stream segments 000000.arrows, 000001.arrows...
      evals/            per-evaluation scalars, same format
      grids/            step-00001234.png, the annotated 4x8 grid of each evaluation
      checkpoints/      step-00001234.pt (torch.save of tensors and plain types only)
      .lock             held (flock) by the process writing the run

Durability: rows are buffered in memory and written as one Arrow record batch per flush (every
``log.flush_steps`` steps or ``log.flush_seconds`` seconds, whichever comes first). Each batch is
flushed to the operating system at once, so a process killed with SIGKILL loses only the rows
since the last flush. Readers stop at the first incomplete batch, so a run that was killed, or is
still being written, always reads. Small files (run.json, grids, checkpoints) are written to a
temporary name and renamed, so they are either old or new, never half-written.

The package's parts: :mod:`~vaediag.rundir.layout` (names, atomic small files),
:mod:`~vaediag.rundir.segments` (the tables), :mod:`~vaediag.rundir.lock`,
:mod:`~vaediag.rundir.writer` and :mod:`~vaediag.rundir.reader`. None imports torch at module
level: analysis and reports read runs without it.
"""

from vaediag.rundir.layout import (
    CHECKPOINTS_DIR,
    CONFIG_TOML,
    ENVIRONMENT_JSON,
    EVALS_DIR,
    EVENTS_JSONL,
    FIXED_NPZ,
    FORMAT_VERSION,
    GRIDS_DIR,
    LOCK_FILE,
    RUN_JSON,
    SCALARS_DIR,
    atomic_write,
    check_run_dir,
    list_checkpoints,
    list_grids,
    remove_temporaries,
    step_file,
)
from vaediag.rundir.lock import RunLock, is_locked
from vaediag.rundir.reader import Run, load_run, read_events_lines
from vaediag.rundir.segments import (
    COMPACT_ROWS,
    DOUBLE_COLUMNS,
    INT_COLUMNS,
    TableWriter,
    compact_segment,
    read_table,
    truncate_table,
)
from vaediag.rundir.writer import (
    CLI_HINT,
    RunWriter,
    check_can_create,
    check_can_resume,
    prepare_new,
    remove_run,
)

__all__ = [
    "CLI_HINT", "CHECKPOINTS_DIR", "COMPACT_ROWS", "CONFIG_TOML", "DOUBLE_COLUMNS",
    "ENVIRONMENT_JSON",
    "EVALS_DIR", "EVENTS_JSONL", "FIXED_NPZ", "FORMAT_VERSION", "GRIDS_DIR", "INT_COLUMNS",
    "LOCK_FILE", "RUN_JSON", "SCALARS_DIR", "Run", "RunLock", "RunWriter", "TableWriter",
    "atomic_write", "check_can_create", "check_can_resume", "check_run_dir", "compact_segment",
    "is_locked", "list_checkpoints", "list_grids", "load_run", "prepare_new", "read_events_lines",
    "read_table", "remove_run", "remove_temporaries", "step_file", "truncate_table",
]
