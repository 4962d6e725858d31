"""What a step's gradients say, cheaply: each parameter's gradient norm in one list-wide
operation, and, on a step that went wrong, where the non-finite values started."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vaediag.probes.sampling import local


def grad_norms(params: list[tuple[str, nn.Parameter]],
               sharded: bool = False) -> torch.Tensor | None:
    """(P,) L2 norm of each parameter's gradient (0 where it has none), on the device, in one
    list-wide operation; None when no parameter has a gradient. ``sharded`` (FSDP): of this
    rank's shard of each gradient."""
    grads = [p.grad if p.grad is None else local(p.grad) for _, p in params] if sharded \
        else [p.grad for _, p in params]
    present = [g for g in grads if g is not None]
    if not present:
        return None
    with torch.no_grad():  # gradients that carry a graph (create_graph=True): not recorded
        norms = torch.stack(torch._foreach_norm(present))
    if len(present) == len(grads):
        return norms
    full = torch.zeros(len(grads), device=norms.device, dtype=norms.dtype)
    full[[i for i, g in enumerate(grads) if g is not None]] = norms
    return full


def forward_order(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """The order in which ``run()`` (a forward pass) first calls each module that owns
    parameters: {parameter name: rank}. The backward pass reaches the highest rank first."""
    order: dict[str, int] = {}
    owners = {name: m for name, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))}

    def hook(name: str):
        def record(module, inputs):
            order.setdefault(name, len(order))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in owners.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    ranks = {}
    for pname, _ in model.named_parameters():
        module = pname.rpartition(".")[0]
        ranks[pname] = order.get(module, -1)
    return ranks


def nonfinite_origin(params: list[tuple[str, nn.Parameter]], norms: torch.Tensor | None,
                     rank: dict[str, int], weights: bool = True) -> list[str]:
    """Where non-finite values started: parameters that are themselves non-finite
    (``weight:NAME``, a corrupted weight), else the layer whose gradient the backward pass
    reached first among those that went non-finite (``grad:NAME``, the one latest in the
    forward pass, by ``rank`` from :func:`forward_order`). Scans the parameters, so it runs
    only on steps that went wrong."""
    out = []
    with torch.no_grad():
        bad_weights = [n for n, p in params
                       if weights and not bool(torch.isfinite(local(p)).all())]
    out += [f"weight:{n}" for n in bad_weights[:3]]
    if norms is not None:
        values = norms.tolist()
        bad = [n for (n, _), v in zip(params, values, strict=True) if not math.isfinite(v)]
        if bad:
            origin = max(bad, key=lambda n: rank.get(n, -1))
            out.append(f"grad:{origin}")
    return out
