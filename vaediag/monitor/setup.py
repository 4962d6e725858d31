"""Setting a recording Monitor up: which probes, and the run it records into (the session it
was handed, a new run directory of its own, or none on a rank that writes nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vaediag import probes as probe_library
from vaediag.errors import UserError, first_line
from vaediag.monitor.ranks import ShadowSession
from vaediag.probes.base import Probe
from vaediag.session import RunSession


def chosen_probes(spec: str | Sequence[Probe], extra: Sequence[Probe]) -> list[Probe]:
    """The probes of a preset name or a list, and the extra ones."""
    chosen = probe_library.build(spec) if isinstance(spec, str) else _probe_list(spec, "probes")
    return [*chosen, *_probe_list(extra, "extra_probes")]


def _probe_list(probes: Sequence[Probe], name: str) -> list[Probe]:
    if isinstance(probes, (str, bytes)) or not all(isinstance(p, Probe) for p in probes):
        raise UserError(f"{name}= must be a list of vaediag.probes.Probe instances"
                        + (" or a preset name" if name == "probes" else ""))
    return list(probes)


def open_session(run_dir: str | Path | RunSession, records: bool, settings: dict[str, Any],
                 config: Any, overwrite: bool, seed: int,
                 device: torch.device) -> RunSession | ShadowSession:
    """The run a Monitor records into: the session it was handed (``vaediag train``), a new
    run directory of its own, or, on a rank that does not record (FSDP), none."""
    if not records:  # FSDP: in step with rank 0, writing nothing
        return ShadowSession(
            run_dir.path if isinstance(run_dir, RunSession) else Path(run_dir),
            resumed=run_dir.resumed if isinstance(run_dir, RunSession) else False)
    if isinstance(run_dir, RunSession):
        if run_dir.writer is None:
            raise UserError("Monitor needs an opened RunSession: call its open() first")
        return run_dir
    import tomli_w

    from vaediag import environment
    if not isinstance(config, (dict, type(None))):
        raise UserError(f"config= must be a dict of your settings, got "
                        f"{type(config).__name__}")
    try:
        config_toml = tomli_w.dumps({**settings, **(config or {})})
    except (TypeError, ValueError) as exc:
        raise UserError(f"config= must hold TOML values (numbers, strings, lists, "
                        f"dicts): {first_line(exc, 120)}") from None
    session = RunSession.new(run_dir, overwrite=overwrite,
                             hint="pass overwrite=True to replace it")
    session.open(config_toml=config_toml, environment=environment.collect(device, seed))
    return session
