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
Tensors larger than ``max_entries`` are measured on a fixed random run of that many entries.
Other optimizers: the probe declines ("not applicable") and records nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vaediag.probes.base import LayerIndex, Probe, ProbeSetup, StepContext, per_index

STATS = ("adam_update_rms", "adam_eps_frac", "adam_sign_frac", "adam_rms_t", "adam_eff_lr")

#: The statistics that depend on v alone. v is an exponential average with a time constant of
#: 1 / (1 - beta2) steps (1000 at the default 0.999) that can fall by at most a factor beta2 per
#: step, so these change slowly: recorded every ``V_EVERY`` steps, which saves the most
#: expensive operations (a log over every entry) on the other steps.
V_STATS = ("adam_eps_frac", "adam_eff_lr")
V_EVERY = 10

#: Parameter tensors with more entries than this are measured on a fixed random sample of this
#: many entries, which bounds the cost per step whatever the model's size. The sample is one
#: contiguous run of entries at a random offset fixed for the run (a run of whole filters or
#: rows, which are exchangeable), so that it is a plain view: no gather, and only the sampled
#: memory is read. The ``full`` preset measures every entry of every tensor.
MAX_ENTRIES = 1 << 14


def sample_span(numel: int, cap: int | None, seed: int) -> tuple[int, int]:
    """(start, length) of the entries measured for a tensor of ``numel`` entries."""
    if cap is None or numel <= cap:
        return 0, numel
    start = int(torch.randint(0, numel - cap + 1, (1,),
                              generator=torch.Generator().manual_seed(seed)))
    return start, cap


def moment_sums(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                v_max: torch.Tensor | None, sizes: list[int], t: float, lr: float,
                beta1: float, beta2: float, eps: float, v_stats: bool = True,
                work: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over each segment (``sizes``) of flat moments of
    [u^2, sqrt(v^) < eps, |u| > 0.9, g^2 / max(v^, eps^2), log(lr / (sqrt(v^) + eps))]:
    shape (len(sizes), 5), NaN in columns 1 and 4 when ``v_stats`` is False.

    One pipeline of in-place operations over every tensor at once, writing the five quantities
    into rows 0-4 of ``work`` (6, N; row 5 is scratch), then one sum per segment. On a CPU the
    fixed cost of an operation, not arithmetic, is what makes per-tensor statistics slow.
    """
    n = m.numel()
    w = work if work is not None else torch.empty(6, n, device=m.device)
    a = w[5]
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    torch.div(v_max if v_max is not None else v, bc2, out=a).sqrt_()  # sqrt(v^) in u
    if v_stats:
        torch.lt(a, eps, out=w[1])
    if v_max is not None:  # amsgrad: RMS_t still uses the running v^, not its maximum
        torch.div(v, bc2, out=w[3]).sqrt_().clamp_min_(eps)
    else:
        torch.clamp(a, min=eps, out=w[3])
    torch.div(g, w[3], out=w[3]).mul_(w[3])  # g^2 / max(v^, eps^2)
    a.add_(eps)  # Adam's denominator sqrt(v^) + eps
    if v_stats:
        torch.log(a, out=w[4]).neg_().add_(math.log(lr) if lr > 0 else math.nan)
    torch.div(m, a, out=w[0]).div_(bc1)  # u
    torch.gt(torch.abs(w[0], out=w[2]), 0.9, out=w[2])
    w[0].mul_(w[0])
    rows = w[:5]
    sums = torch.stack([s.sum(1) for s in rows.split(sizes, 1)]).double().cpu()
    if not v_stats:
        sums[:, [1, 4]] = math.nan
    return sums


def summarise(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Turn (..., 5) sums and (...,) entry counts into the five statistics."""
    mean = sums / counts.unsqueeze(-1).clamp_min(1)
    return torch.stack([mean[..., 0].sqrt(), mean[..., 1], mean[..., 2], mean[..., 3].sqrt(),
                        mean[..., 4].exp()], -1)


@dataclass
class _Batch:
    """The parameters of one optimizer group, ready for :func:`moment_sums`."""

    index: list[int]  # parameter positions
    group: dict[str, Any]
    spans: list[tuple[int, int]]  # (start, length) measured in each parameter
    m: list[torch.Tensor]  # views of the measured entries of the optimizer's state
    v: list[torch.Tensor]
    v_max: list[torch.Tensor] | None
    work: torch.Tensor  # (6, N) buffer
    flat: torch.Tensor  # (4, N) buffer: m, v, g, v_max concatenated


def _plan(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
          max_entries: int | None) -> list[_Batch]:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    members: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p)
        if state and "exp_avg" in state:
            members.setdefault(id(group_of[id(p)]), []).append(i)
    plan = []
    for index in members.values():
        states = [optimizer.state[params[i]] for i in index]
        spans = [sample_span(params[i].numel(), max_entries, seed=i) for i in index]

        def views(key: str, states=states, spans=spans) -> list[torch.Tensor]:
            return [s[key].detach().reshape(-1)[a:a + n] for s, (a, n) in zip(states, spans,
                                                                                strict=True)]

        n = sum(length for _, length in spans)
        device = params[index[0]].device
        amsgrad = all("max_exp_avg_sq" in s for s in states)
        plan.append(_Batch(index, group_of[id(params[index[0]])], spans, views("exp_avg"),
                           views("exp_avg_sq"), views("max_exp_avg_sq") if amsgrad else None,
                           torch.empty(6, n, device=device), torch.empty(4, n, device=device)))
    return plan


def _signature(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> tuple:
    """Changes when the optimizer's state tensors are replaced (first step, load_state_dict)."""
    return tuple(id(optimizer.state[p].get("exp_avg")) if p in optimizer.state else 0
                 for p in params)


def adam_stats(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               grads: list[torch.Tensor | None], layers: LayerIndex, v_stats: bool = True,
               max_entries: int | None = MAX_ENTRIES,
               cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-layer and global Adam statistics from the optimizer's state (after its step).

    ``cache`` keeps the plan (groups, views, buffers) between calls of one probe.
    """
    cache = {} if cache is None else cache
    signature = _signature(optimizer, params)
    if cache.get("signature") != signature:
        cache.update(signature=signature, plan=_plan(optimizer, params, max_entries))
    plan: list[_Batch] = cache["plan"]
    if not plan:
        return {}
    rows, order, numel = [], [], []
    for b in plan:
        g = [(grads[i] if grads[i] is not None else torch.zeros_like(params[i]))
             .detach().reshape(-1)[a:a + n] for i, (a, n) in zip(b.index, b.spans, strict=True)]
        torch.cat(b.m, out=b.flat[0])
        torch.cat(b.v, out=b.flat[1])
        torch.cat(g, out=b.flat[2])
        if b.v_max is not None:
            torch.cat(b.v_max, out=b.flat[3])
        sizes = [n for _, n in b.spans]
        b1, b2 = b.group["betas"]
        rows.append(moment_sums(b.flat[0], b.flat[1], b.flat[2],
                                b.flat[3] if b.v_max is not None else None, sizes,
                                float(optimizer.state[params[b.index[0]]]["step"]),
                                float(b.group["lr"]), b1, b2, b.group["eps"], v_stats, b.work))
        order += b.index
        numel += [float(n) for n in sizes]
    sums = torch.cat(rows)  # (P', 5), parameters in `order`
    counts = torch.tensor(numel, dtype=torch.float64)
    index = layers.param_layer[torch.tensor(order)]
    n_layers = len(layers.layers)
    layer_sums = torch.zeros(n_layers, 5, dtype=torch.float64).index_add_(0, index, sums)
    layer_counts = torch.zeros(n_layers, dtype=torch.float64).index_add_(0, index, counts)
    per_layer = summarise(layer_sums, layer_counts).float()
    overall = summarise(sums.sum(0), counts.sum()).float()
    has = layer_counts > 0
    names = [n for n, ok in zip(layers.layers, has.tolist(), strict=True) if ok]
    out: dict[str, Any] = {}
    for k, stat in enumerate(STATS):
        if not v_stats and stat in V_STATS:
            continue
        out[stat] = overall[k]
        out.update(per_index("layer", stat, per_layer[has, k], names))
    return out


class AdamState(Probe):
    name = "adam"
    needs = frozenset({"optimizer"})

    def setup(self, info: ProbeSetup) -> str | None:
        opt = info.optimizer
        if opt is None:
            return "no optimizer given to the Monitor"
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            return f"the optimizer is {type(opt).__name__}, not Adam or AdamW"
        return None

    def __init__(self, schedule=None, max_entries: int | None = MAX_ENTRIES):
        """``max_entries``: sample larger tensors down to this many entries (None: all)."""
        super().__init__(schedule)
        self.max_entries = max_entries
        self._cache: dict[str, Any] = {}

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        params = [p for _, p in ctx.params]
        return adam_stats(ctx.optimizer, params, [p.grad for p in params], ctx.layers,
                          v_stats=ctx.step % V_EVERY == 0, max_entries=self.max_entries,
                          cache=self._cache)
