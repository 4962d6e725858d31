"""vaediag under ``torch.distributed`` (torchrun, DDP, FSDP2): one run directory, written by
rank 0.

:class:`ProcessGroup` is the group ``vaediag train`` and ``vaediag replay`` join; :class:`Ranks`
is the Monitor's view of it (any process group the user's own loop set up).

Every rank creates its Monitor with the same arguments. Rank 0 records; the others
(:class:`vaediag.monitor.follower.Follower`) write nothing. At each step every rank takes part
in one small collective (:meth:`Ranks.exchange`), an all-gather of its loss terms (and its
request to stop) and its summary of mu and logvar, each declared with how the ranks' values
combine (:class:`Shared`, :class:`Reduce`; :func:`vaediag.monitor.roles.shared_values`), so
that:

- rank 0 records the global batch: ``recon``, ``kl`` and ``total`` are the mean over ranks, the
  latent statistics those of every rank's batch together, and ``recon_rank_spread`` /
  ``kl_rank_spread`` (largest minus smallest rank) say how unlike one another the ranks'
  batches were;
- a non-finite loss term on any rank is seen by every rank (each takes the same decision), and
  rank 0's ``nonfinite`` event names the ranks it appeared on;
- a stop asked for by any rank (rank 0's ``stop_on``, a signal ``vaediag train`` received)
  stops every rank after the same step.

Gradient norms and Adam's statistics need no collective under DDP: the gradients are already
reduced, and every rank's optimizer holds the same state. Evaluations run on rank 0 on the
unwrapped module (a DDP forward would wait for the other ranks).

Under FSDP (``fully_shard``: parameters, gradients and Adam's state are DTensor shards) each
rank holds a part of every tensor, and a forward pass needs every rank. So every rank runs the
whole Monitor in step (the same probes at the same steps, the same evaluations), on its own
shards; only rank 0 writes (the others, :class:`vaediag.monitor.roles.Shadow`, have a
:class:`ShadowSession` that discards what they would have written). What is measured over
parameter entries is combined:

- the gradient norms: each rank's sums of squares per parameter ride in the step's one
  collective, and every rank adds them up;
- Adam's statistics, the update ratios and the count of non-finite gradient entries: each
  rank's sums over its sampled entries (and their counts) are all-reduced
  (:meth:`Ranks.reduce`, ``ctx.reduce`` for a probe) on the steps those probes run: one more
  small collective per probe that ran.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaediag.columns import LOSS_TERMS, TOTAL
from vaediag.errors import UserError
from vaediag.probes.sampling import is_dtensor


class Reduce(enum.Enum):
    """How the ranks' values of one :class:`Shared` value combine."""

    #: every rank's, as a (ranks, n) tensor (e.g. the loss terms: their mean, their spread,
    #: and the ranks a term went non-finite on are all taken from them)
    EACH = "every rank's"
    #: the largest over ranks (e.g. a request to stop: any rank's)
    MAX = "the largest over ranks"
    #: the sum over ranks (e.g. sums of squares over each rank's shards)
    SUM = "the sum over ranks"


@dataclass(frozen=True)
class Shared:
    """One value each rank contributes to the step's one collective, with how the ranks'
    values combine (in the spirit of torchmetrics' ``add_state(..., dist_reduce_fx=)``).
    ``value`` is a number or a tensor (any shape: sent flat, in float64)."""

    name: str
    value: torch.Tensor | float
    reduce: Reduce

    def flat(self, device: torch.device) -> torch.Tensor:
        if isinstance(self.value, torch.Tensor):
            return self.value.detach().reshape(-1).to(device, torch.float64)
        return torch.tensor([float(self.value)], dtype=torch.float64, device=device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel); the model itself otherwise."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (``fully_shard``: DTensor parameters).
    The older wrapper (``FullyShardedDataParallel``, flat parameters), around the model or any
    of its modules, is refused: its parameters are not the model's own."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise UserError("the model is wrapped in FullyShardedDataParallel (FSDP1, also "
                        "Lightning's FSDP strategy), whose flat parameters are not the model's "
                        "own: shard it with torch.distributed.fsdp.fully_shard (FSDP2), or use "
                        "DistributedDataParallel")
    sharded = any(is_dtensor(p) for p in model.parameters())
    state = getattr(model, "_get_fsdp_state", None)
    if sharded and state is not None and getattr(state(), "_is_root", False) is None:
        # the Monitor's first forward pass would go through encode(), not the root's forward,
        # and FSDP would then refuse the root's own first forward pass
        raise UserError("the whole model is sharded (fully_shard(model)) and has not run a "
                        "forward pass yet: create the Monitor after the model's first "
                        "forward pass, or shard only the modules encode() and decode() use")
    return sharded




class Ranks:
    """This process's place in a ``torch.distributed`` job (a job of one when there is none)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.active = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def records(self) -> bool:
        """Whether this rank writes the run directory (rank 0)."""
        return self.rank == 0

    def exchange(self, shared: list[Shared], device: torch.device) -> dict[str, torch.Tensor]:
        """The step's one collective: every rank's ``shared`` values (the same names and sizes
        on every rank) in one all-gather on ``device``, each combined as it declares
        (:class:`Reduce`): ``{name: combined value}``, float64 on ``device``."""
        flats = [s.flat(device) for s in shared]
        mine = torch.cat(flats) if len(flats) > 1 else flats[0]
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self._dist.all_gather(out, mine)
        every = torch.stack(out)
        combined: dict[str, torch.Tensor] = {}
        at = 0
        for s, flat in zip(shared, flats, strict=True):
            values = every[:, at:at + flat.numel()]
            at += flat.numel()
            combined[s.name] = (values if s.reduce is Reduce.EACH else
                                values.amax(0) if s.reduce is Reduce.MAX else values.sum(0))
        return combined

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums over this rank's shard -> sums over every rank's (in place; a collective that
        every rank joins)."""
        self._dist.all_reduce(sums)
        return sums

    def agree(self, ok: bool) -> None:
        """After setting up: every rank learns whether all could (so none waits at the first
        step for a rank that failed). A rank that set up raises when another did not; one that
        did not raises its own error."""
        flag = torch.tensor([1.0 if ok else 0.0])
        out = [torch.empty_like(flag) for _ in range(self.world)]
        self._dist.all_gather(out, flag)
        failed = [r for r, f in enumerate(out) if f.item() == 0.0]
        if ok and failed:
            raise UserError(f"rank {failed[0]} could not set up its Monitor (its error says "
                            f"why); rank {self.rank} stops too")


@dataclass
class StopState:
    """Stopping every rank together. This rank asks the ranks to stop (sent at the next step's
    collective); a request was read from a step's collective (with ``read_before_step=False``
    possibly early, at an evaluation or checkpoint on rank 0); every rank learned that they stop
    now (agreed at ``after_backward``, where every rank reads the same step's values)."""

    asked: bool = False
    read: bool = False
    now: bool = False


class DiscardWriter:
    """The writer of a rank that does not record (under FSDP): takes every write, keeps none."""

    def _discard(self, *args: Any, **kwargs: Any) -> None:
        return None

    log_step = log_step_parts = log_columns = log_eval = event = save_fixed = save_config = \
        save_grid = save_checkpoint = flush = set_status = close = _discard


@dataclass
class ShadowSession:
    """The session of a rank that runs the Monitor in step with rank 0 but writes nothing
    (under FSDP): rank 0's run directory is never touched."""

    path: Path
    resumed: bool = False
    writer: DiscardWriter = field(default_factory=DiscardWriter)
    before_abort: list[Any] = field(default_factory=list)
    closed: bool = False

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> None:
        pass

    def close(self, status: str, step: int, message: str = "") -> None:
        self.closed = True

    def discard(self, message: str) -> None:
        """Rank 0 owns the run directory: nothing to delete here."""
        self.closed = True


def nonfinite_ranks(values: list[list[float]]) -> dict[str, list[int]]:
    """{term: the ranks whose value was not finite}, from the gathered values on the host."""
    out: dict[str, list[int]] = {}
    for rank, row in enumerate(values):
        for i, term in enumerate(LOSS_TERMS):
            if not math.isfinite(row[i]) and not (term == TOTAL and math.isnan(row[i])
                                                  and all(math.isnan(r[i]) for r in values)):
                out.setdefault(term, []).append(rank)
    return out


@dataclass
class ProcessGroup:
    """The process group ``vaediag train`` and ``vaediag replay`` join under ``torchrun``
    (``WORLD_SIZE`` in the environment; else a job of one): where this process runs, every
    rank's random state for the checkpoint, and a clean end."""

    rank: int = 0
    world: int = 1
    local: int = 0
    joined: bool = False  # this call started the process group (and ends it)

    @classmethod
    def join(cls, device: str) -> ProcessGroup:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        joined = not dist.is_initialized()
        if joined:
            cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local, joined)

    def device(self, name: str) -> str:
        """A CUDA device is the local rank's GPU."""
        if self.world > 1 and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local}"
        return name

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a generator's state), on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def leave(self, clean: bool) -> None:
        """End the process group this call started; after a clean finish, once every rank is
        done (so none loses the group's store while it still needs it)."""
        if self.joined:
            import torch.distributed as dist

            if clean:
                dist.barrier()
            dist.destroy_process_group()
