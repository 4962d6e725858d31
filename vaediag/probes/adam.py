"""Adam/AdamW's own state, per layer, read after each step: is the optimizer still healthy?

From ``optimizer.state`` (moments ``m``, ``v``, step count ``t``) with bias correction
``m^ = m / (1 - b1^t)``, ``v^ = v / (1 - b2^t)``, and the update direction
``u = m^ / (sqrt(v^) + eps)`` (the step is ``-lr * u``), per layer:

- ``adam_update_rms``: sqrt(mean(u^2)). About 0.2-0.3 while gradients are noisy and
  uncorrelated from step to step; it rises toward 1 when successive gradients agree
  (time-correlated), the regime Molybog et al. (2023) tie to Adam's loss spikes.
- ``adam_eps_frac``: fraction of entries with sqrt(v^) < eps: there the step is lr * m^ / eps,
  no longer normalised (epsilon-dominated); a large fraction plus a sudden gradient means a
  huge step.
- ``adam_sign_frac``: fraction with |u| > 0.9: Adam acting as sign descent (every entry moves
  by ~lr whatever its gradient).
- ``adam_rms_t``: sqrt(mean(g^2 / max(v^, eps^2))) with the step's own gradient g and v^ already
  updated with it, as in StableAdamW (Wortsman et al. 2023). About 1 when v^ tracks the gradient
  scale; well above 1 means v^ underestimates the current gradients, and a loss spike often
  follows within a few steps.
- ``adam_eff_lr``: geometric mean over entries of lr / (sqrt(v^) + eps), the per-entry step size
  Adam applies to m^.

``adam_eps_frac`` and ``adam_eff_lr`` depend on v alone, which moves slowly (see ``V_STATS``):
they are recorded every ``V_EVERY`` steps, the others every step the probe runs.

Global versions (no prefix) pool all entries. With amsgrad, ``max_exp_avg_sq`` replaces v in u.
Tensors larger than ``max_entries`` are measured on a fixed sample of about that many entries
(every k-th entry, k prime: :class:`~vaediag.probes.base.EntrySample`).
Other optimizers: the probe declines ("not applicable") and records nothing.

Everything stays on the model's device until the Monitor's one read of the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vaediag.columns import ADAM_EFF_LR, ADAM_EPS_FRAC, ADAM_RMS_T, ADAM_SIGN_FRAC, ADAM_UPDATE_RMS
from vaediag.probes.base import Probe, ProbeSetup, per_index
from vaediag.probes.context import StepContext, no_reduce
from vaediag.probes.layers import LayerIndex
from vaediag.probes.sampling import EntrySample, local

#: The statistics, in the order of the rows of :func:`moment_rows`: the first three every step
#: the probe runs, the last two (v alone, ``V_STATS``) every ``V_EVERY`` steps, so that either
#: set is one slice of the work buffer.
ROWS = (ADAM_UPDATE_RMS, ADAM_SIGN_FRAC, ADAM_RMS_T, ADAM_EPS_FRAC, ADAM_EFF_LR)

#: The statistics that depend on v alone. v is an exponential average with a time constant of
#: 1 / (1 - beta2) steps (1000 at the default 0.999) that can fall by at most a factor beta2 per
#: step, so these change slowly: recorded every ``V_EVERY`` steps, which saves the most
#: expensive operations (a log over every entry) on the other steps.
V_STATS = ROWS[3:]
V_EVERY = 10

#: Layers with more entries than this are measured on a fixed sample of exactly this many
#: (every k-th entry of each tensor for a prime k, a plain strided view: no gather, and a sample
#: spread over every filter, row and kernel tap), which bounds the cost per step whatever the
#: model's size. The ``full`` preset measures every entry of every tensor.
MAX_ENTRIES = 1 << 11



def moment_rows(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, v_max: torch.Tensor | None,
                t: float | torch.Tensor, lr: float | torch.Tensor, beta1: float, beta2: float,
                eps: float, v_stats: bool, work: torch.Tensor) -> torch.Tensor:
    """Per-entry moments, written into ``work`` (6, N; row 5 is scratch) in the order of
    ``ROWS``: [(m / (sqrt(v^) + eps))^2, |u| > 0.9, g^2 / max(v^, eps^2), sqrt(v^) < eps,
    log(lr / (sqrt(v^) + eps))]; returns rows 0-4, or 0-2 unless ``v_stats``. Row 0 is u^2
    times bc1^2 (bias correction of m, applied to the sums by :func:`summarise`).

    A dozen in-place operations over every entry at once. ``t`` (Adam's step count) and ``lr``
    may be tensors on the device (a capturable optimizer), so nothing here reads the device.
    """
    a = work[5]
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    torch.div(v_max if v_max is not None else v, bc2, out=a).sqrt_()  # sqrt(v^) in u
    if v_stats:
        torch.lt(a, eps, out=work[3])
    if v_max is not None:  # amsgrad: RMS_t still uses the running v^, not its maximum
        torch.div(v, bc2, out=work[2]).sqrt_().clamp_min_(eps)
    else:
        torch.clamp(a, min=eps, out=work[2])
    torch.div(g, work[2], out=work[2]).square_()  # g^2 / max(v^, eps^2)
    a.add_(eps)  # Adam's denominator sqrt(v^) + eps
    if v_stats:
        torch.log(a, out=work[4]).neg_().add_(torch.log(torch.as_tensor(lr, dtype=a.dtype,
                                                                        device=a.device)))
    torch.div(m, a, out=work[0])  # u * bc1
    torch.gt(torch.abs(work[0], out=work[1]), 0.9 * bc1, out=work[1])
    work[0].square_()
    return work[:5] if v_stats else work[:3]


def summarise(sums: torch.Tensor, counts: torch.Tensor,
              bc1: float | torch.Tensor) -> torch.Tensor:
    """Turn (R, ...) sums of :func:`moment_rows` and (...) entry counts into the statistics
    of ``ROWS[:R]``."""
    mean = sums / counts.clamp_min(1)
    stats = [mean[0].sqrt() / bc1, mean[1], mean[2].sqrt()]
    if len(sums) == 5:
        stats += [mean[3], mean[4].exp()]
    return torch.stack(stats)


@dataclass
class _Group:
    """The parameters of one optimizer group with Adam state, ready for :func:`moment_rows`."""

    group: dict[str, Any]
    sample: EntrySample
    step: Any  # the state's step count (a tensor or a number) of the group's first parameter
    m: list[torch.Tensor]  # views of the sampled entries of the optimizer's state
    v: list[torch.Tensor]
    v_max: list[torch.Tensor] | None
    flat: torch.Tensor  # (4, N): m, v, g, v_max gathered
    work: torch.Tensor  # (6, N)
    layer_ids: torch.Tensor  # on the device


@dataclass
class _Plan:
    groups: list[_Group]
    counts: torch.Tensor  # (L,) entries with Adam state per layer, on the device
    measured: torch.Tensor  # (L',) indices of the layers with any
    names: list[str]  # their names

    @functools.cached_property
    def all_counts(self) -> torch.Tensor:
        """(L + 1,) the entries of each layer, then of all."""
        return torch.cat([self.counts, self.counts.sum().reshape(1)])

    def columns(self, rows: int) -> tuple[str, ...]:
        """The names of :func:`adam_stats`' vector: each of the first ``rows`` statistics,
        overall, then per measured layer (made once per row count)."""
        known = self.__dict__.setdefault("_columns", {})
        if rows not in known:
            out: list[str] = []
            for stat in ROWS[:rows]:
                out.append(stat)
                out.extend(next(iter(per_index("layer", stat, torch.zeros(len(self.names)),
                                               self.names))))
            known[rows] = tuple(out)
        return known[rows]


def _plan(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
          layers: LayerIndex, max_entries: int | None,
          reduce: Callable[[torch.Tensor], torch.Tensor]) -> _Plan:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    members: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p)
        if state and "exp_avg" in state and id(p) in group_of:
            members.setdefault(id(group_of[id(p)]), []).append(i)
    numels = [local(p).numel() for p in params]  # this rank's shard under FSDP
    device, dtype = params[0].device, params[0].dtype
    counts = torch.zeros(len(layers.layers), dtype=torch.float64)
    groups = []
    for index in members.values():
        sample = EntrySample(index, numels, layers, max_entries, device)
        states: list[dict[str, Any] | None] = [
            optimizer.state[params[i]] if i in index else None for i in range(len(params))]

        def views(key: str, states=states, sample=sample) -> list[torch.Tensor]:
            return sample.views([s[key] if s is not None else None for s in states])

        amsgrad = all("max_exp_avg_sq" in (states[i] or {}) for i in index)
        counts.index_add_(0, layers.param_layer[index], torch.tensor(
            [float(numels[i]) for i in index], dtype=torch.float64))
        groups.append(_Group(group_of[id(params[index[0]])], sample,
                             optimizer.state[params[index[0]]]["step"], views("exp_avg"),
                             views("exp_avg_sq"),
                             views("max_exp_avg_sq") if amsgrad else None,
                             torch.empty(4, sample.size, device=device, dtype=dtype),
                             torch.empty(6, sample.size, device=device, dtype=dtype),
                             sample.layer_ids.to(device)))
    counts = reduce(counts.to(device)).cpu()  # every rank's entries
    has = (counts > 0).tolist()
    return _Plan(groups, counts.float().to(device),
                 torch.tensor([i for i, h in enumerate(has) if h], dtype=torch.long,
                              device=device),
                 [name for name, h in zip(layers.layers, has, strict=True) if h])


def _signature(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> tuple:
    """Changes when the optimizer's state tensors are replaced (first step, load_state_dict)."""
    return tuple(id(optimizer.state[p].get("exp_avg")) if p in optimizer.state else 0
                 for p in params)


def _step_count(step: Any) -> float | torch.Tensor:
    """Adam's step count: a number, or a tensor read without a device sync when it is on the
    CPU (torch's default) and kept as a tensor when it is on the device (capturable)."""
    if isinstance(step, torch.Tensor):
        return float(step) if step.device.type == "cpu" else step.float()
    return float(step)


def adam_stats(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               grads: list[torch.Tensor | None], layers: LayerIndex, v_stats: bool = True,
               max_entries: int | None = MAX_ENTRIES,
               cache: dict[str, Any] | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce) -> dict[str, Any]:
    """Per-layer and global Adam statistics from the optimizer's state (after its step).

    ``cache`` keeps the plan (groups, views, buffers) between calls of one probe. ``reduce``
    adds up sums over the ranks' shards (FSDP: ``StepContext.reduce``).
    """
    cache = {} if cache is None else cache
    signature = _signature(optimizer, params)
    if cache.get("signature") != signature:
        cache.update(signature=signature,
                     plan=_plan(optimizer, params, layers, max_entries, reduce))
    plan: _Plan = cache["plan"]
    if not plan.groups:
        return {}
    sums = None
    for g in plan.groups:
        s = g.sample
        torch.cat(g.m, out=g.flat[0])  # cached views of the state: the optimizer updates it
        torch.cat(g.v, out=g.flat[1])  # in place
        s.gather(grads, g.flat[2])
        if g.v_max is not None:
            torch.cat(g.v_max, out=g.flat[3])
        b1, b2 = g.group["betas"]
        t = _step_count(g.step)
        rows = moment_rows(g.flat[0], g.flat[1], g.flat[2],
                           g.flat[3] if g.v_max is not None else None, t,
                           g.group["lr"], b1, b2, g.group["eps"], v_stats, g.work)
        part = s.layer_sums(rows)
        if sums is None:
            sums = torch.zeros(len(rows), len(plan.counts), device=part.device,
                               dtype=part.dtype)
            bc1 = 1.0 - b1 ** t  # of the first group: every group sees the same step count
        sums.index_add_(1, g.layer_ids, part)
    assert sums is not None  # the plan has groups
    reduce(sums)
    # every layer and, as one more column, all of them: one summary (R, L + 1)
    stats = summarise(torch.cat([sums, sums.sum(1, keepdim=True)], 1), plan.all_counts, bc1)
    # one vector: each statistic overall, then per measured layer (the columns' order)
    flat = torch.cat([stats[:, -1:], stats[:, plan.measured]], 1).reshape(-1)
    out: dict[Any, Any] = {plan.columns(len(sums)): flat}
    return out


class AdamState(Probe[StepContext]):
    name = "adam"
    needs = frozenset({"optimizer"})

    def setup(self, info: ProbeSetup) -> str | None:
        opt = info.optimizer
        if opt is None:
            return "no optimizer given to the Monitor"
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            return f"the optimizer is {type(opt).__name__}, not Adam or AdamW"
        return None

    def __init__(self, schedule=None, max_entries: int | None = MAX_ENTRIES, *,
                 when_unusual: bool = False):
        """``max_entries``: measure larger layers on a sample of this many entries (None:
        every entry)."""
        super().__init__(schedule, when_unusual=when_unusual)
        self.max_entries = max_entries
        self._cache: dict[str, Any] = {}

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        params = [p for _, p in ctx.params]
        assert ctx.optimizer is not None  # setup declined without one
        return adam_stats(ctx.optimizer, params, [p.grad for p in params], ctx.layers,
                          v_stats=ctx.step % V_EVERY == 0, max_entries=self.max_entries,
                          cache=self._cache, reduce=ctx.reduce)
