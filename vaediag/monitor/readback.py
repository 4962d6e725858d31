"""Reading a step's values from the device: every tensor of a step (and the step before's held
probe values) in one transfer per device."""

from __future__ import annotations

from typing import Any

import torch


def to_floats(values: dict[Any, Any]) -> dict[str, float]:
    """Probe results as ``{column: float}``, reading tensors with one transfer per device.

    A key is a column name (value: a float or a 0-d tensor) or a tuple of column names (value:
    a 1-D tensor or array of as many values).
    """
    return read_floats([values])[0]


#: per device, the tensors to read: (group, their column names, the values flattened)
_Packed = dict[torch.device, list[tuple[int, tuple[str, ...], torch.Tensor]]]


def _pack(groups: list[dict[Any, Any]]) -> tuple[list[dict[str, float]], _Packed]:
    """Split ``groups`` into what is on the host already (read now, into the returned dicts)
    and the tensors to read, by device."""
    outs: list[dict[str, float]] = [{} for _ in groups]
    pending: _Packed = {}
    for g, values in enumerate(groups):
        out = outs[g]
        for key, value in values.items():
            names = key if isinstance(key, tuple) else (key,)
            if isinstance(value, torch.Tensor):
                pending.setdefault(value.device, []).append(
                    (g, names, value.detach().reshape(-1).float()))
            elif isinstance(key, tuple):
                out.update(zip(names, (float(v) for v in value), strict=True))
            else:
                out[key] = float(value)
    return outs, pending


def _unpack(outs: list[dict[str, float]], items: list[tuple[int, tuple[str, ...]]],
            flat: list[float]) -> None:
    at = 0
    for g, names in items:
        outs[g].update(zip(names, flat[at:at + len(names)], strict=True))
        at += len(names)


def read_floats(groups: list[dict[Any, Any]]) -> list[dict[str, float]]:
    """:func:`to_floats` of several dicts at once: one transfer per device for all of them."""
    outs, pending = _pack(groups)
    for items in pending.values():
        _unpack(outs, [(g, names) for g, names, _ in items],
                torch.cat([v for _, _, v in items]).tolist())
    return outs


class Pending:
    """Values copied from the device without waiting, read once the copy has completed.

    The tensors of ``groups`` (as :func:`read_floats` takes them) are packed into one vector
    per device and copied into a host buffer with ``non_blocking=True`` (pinned memory on a
    GPU, with an event recorded after the copy): nothing here waits for the device. Reading
    them (:meth:`result`) a step later waits only for a copy that has long finished, so the CPU
    never stops queueing work to read a step's statistics. On a CPU the copy is immediate.
    """

    def __init__(self, groups: list[dict[Any, Any]]):
        self._outs, pending = _pack(groups)
        #: per device: the host buffer, the event after its copy (a GPU's), what it holds
        self.copies: list[tuple[torch.Tensor, Any, list[tuple[int, tuple[str, ...]]]]] = []
        for device, items in pending.items():
            flat = torch.cat([v for _, _, v in items])
            gpu = device.type == "cuda"
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=gpu)
            host.copy_(flat, non_blocking=True)
            event = None
            if gpu:
                event = torch.cuda.Event()
                event.record()
            self.copies.append((host, event, [(g, names) for g, names, _ in items]))

    def result(self) -> list[dict[str, float]]:
        """``{column: float}`` for each group, once every copy has completed."""
        for host, event, items in self.copies:
            if event is not None:
                event.synchronize()
            _unpack(self._outs, items, host.tolist())
        self.copies = []
        return self._outs
