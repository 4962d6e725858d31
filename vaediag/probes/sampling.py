"""Measuring many tensors as one vector: a fixed sample of their entries (:class:`EntrySample`),
and this rank's shard of a tensor sharded by FSDP (:func:`local`).

On a CPU an operation's fixed cost, not its arithmetic, is what makes per-tensor statistics
slow: every statistic of a step is a few operations over one vector, whatever the number of
tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.probes.layers import LayerIndex

_ALL = slice(None)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP shard of a parameter, its gradient or its state)."""
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor sharing its storage); ``t`` otherwise.
    Probes measure the shards; ``ctx.reduce`` adds up their sums over the ranks."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _prime_at_least(n: int) -> int:
    """The smallest prime >= n (n >= 2)."""
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def sample_slice(numel: int, count: int) -> slice:
    """At most ``count`` entries of a flattened tensor of ``numel`` entries, fixed for the run:
    all of them, or every k-th over the whole tensor for the smallest prime k that keeps to
    ``count``. A prime stride shares no factor with a tensor's shape (4x4 kernels, 64
    channels, ...), so the sample visits every filter, row and kernel tap; and it is a plain
    strided view (no gather)."""
    if count >= numel:
        return _ALL
    return slice(0, None, _prime_at_least(max(2, -(-numel // count))))


def _quotas(numels: list[int], cap: int) -> list[int]:
    """Split ``cap`` sampled entries over a layer's tensors in proportion to their sizes (at
    least one entry each)."""
    total = sum(numels)
    quotas = [min(n, max(1, cap * n // total)) for n in numels]
    largest = max(range(len(numels)), key=numels.__getitem__)
    quotas[largest] = min(numels[largest], quotas[largest] + cap - sum(quotas))
    return quotas


class EntrySample:
    """A fixed sample of the entries of a list of tensors (parameters or their optimizer
    state), gathered into one flat vector layer by layer, and reduced per layer.

    Every statistic of a step is then a few operations over one vector, whatever the number of
    tensors: on a CPU the fixed cost of an operation, not its arithmetic, is what makes
    per-tensor statistics slow. A layer with more than ``cap`` entries is measured on exactly
    ``cap`` of them (split over its weight and bias in proportion), each standing for
    ``numel / sampled`` entries of its tensor, so per-layer sums estimate those over every
    entry; smaller layers (and every layer when ``cap`` is None) are measured whole. The
    sampled layers come first, as one (layers x cap) block reduced in a single operation.
    """

    def __init__(self, members: list[int], numels: list[int], layers: LayerIndex,
                 cap: int | None, device: torch.device):
        layer_of = layers.param_layer.tolist()
        by_layer: dict[int, list[int]] = {}
        for i in members:
            by_layer.setdefault(layer_of[i], []).append(i)
        sampled = [la for la, ps in by_layer.items()
                   if cap is not None and sum(numels[i] for i in ps) > cap]
        whole = [la for la in by_layer if la not in sampled]
        self.cap = cap or 0
        self.n_sampled = len(sampled)
        self.order: list[int] = []
        self.slices: dict[int, slice] = {}
        counts: dict[int, int] = {}
        self._pads: dict[int, torch.Tensor] = {}  # after position: zeros completing a layer
        zeros = torch.zeros(self.cap, device=device)
        for la in sampled:
            ps = by_layer[la]
            for i, q in zip(ps, _quotas([numels[i] for i in ps], self.cap), strict=True):
                self.order.append(i)
                self.slices[i] = sample_slice(numels[i], q) if q else slice(0, 0)
                counts[i] = len(range(numels[i])[self.slices[i]])
            pad = self.cap - sum(counts[i] for i in ps)
            if pad:
                self._pads[len(self.order) - 1] = zeros[:pad]
        self.whole_sizes = []
        for la in whole:
            for i in by_layer[la]:
                self.order.append(i)
                self.slices[i] = _ALL
                counts[i] = numels[i]
            self.whole_sizes.append(sum(numels[i] for i in by_layer[la]))
        self.numels = numels
        self.size = sum(counts.values()) + sum(len(z) for z in self._pads.values())
        #: the layers measured (indices into ``layers.layers``), in the order of the vector
        self.layer_ids = torch.tensor(sampled + whole, dtype=torch.long)
        #: per entry of the sampled block: how many entries of its tensor it stands for
        weights = []
        for position, i in enumerate(self.order[:sum(len(by_layer[la]) for la in sampled)]):
            weights.append(torch.full((counts[i],), numels[i] / max(counts[i], 1)))
            if position in self._pads:
                weights.append(torch.zeros(len(self._pads[position])))
        self.weight = torch.cat(weights or [torch.zeros(0)]).to(device)

    def views(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The sampled entries of ``tensors`` (indexed like the parameters; None reads as
        zeros, e.g. a parameter without a gradient at this step), as flat views."""
        out = []
        for position, i in enumerate(self.order):
            t = tensors[i]
            if t is None:
                t = torch.zeros(self.numels[i], device=self.weight.device)
            t = local(t)
            flat = t.detach().view(-1) if t.is_contiguous() else t.detach().reshape(-1)
            out.append(flat if self.slices[i] == _ALL else flat[self.slices[i]])
            if position in self._pads:
                out.append(self._pads[position])
        return out

    def gather(self, tensors: list[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """Copy the sampled entries of ``tensors`` into ``out`` (one vector of ``size``)."""
        return torch.cat(self.views(tensors), out=out)

    def layer_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, N) per-entry values -> (R, layers) sums over each layer's entries (estimated
        for sampled layers)."""
        parts = []
        block = self.n_sampled * self.cap
        if self.n_sampled:
            sampled = rows[:, :block] * self.weight
            parts.append(sampled.view(len(rows), self.n_sampled, self.cap).sum(-1))
        if self.whole_sizes:
            parts.append(torch.stack([s.sum(1) for s in
                                      rows[:, block:].split(self.whole_sizes, 1)], 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
