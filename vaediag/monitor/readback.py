"""Reading a step's values from the device: every tensor of a step (and the step before's
probe values, :class:`Packed`) in one transfer per device, or copied without waiting
(:class:`Pending`) and read a step later."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_floats(values: dict[Any, Any]) -> dict[str, float]:
    """Probe results as ``{column: float}``, reading tensors with one transfer per device.

    A key is a column name (value: a float or a 0-d tensor) or a tuple of column names (value:
    a 1-D tensor or array of as many values).
    """
    packed = Packed(values)
    read = packed.floats(read_arrays(packed.flats))
    return {name: read[name] for key in values  # in the order of ``values``
            for name in (key if type(key) is tuple else (key,))}


#: a row's values in part: a tuple of column names and as many numbers
Part = tuple[tuple[str, ...], Any]


class Packed:
    """A step's probe values, copied into one flat vector per device (so a buffer a probe
    reuses may change before it is read), with their column names; and the values the host
    has already, as :data:`Part` s. ``flats[i]`` holds the columns ``names[i]``.

    Built from a probe-result dict (a column name -> a number or 0-d tensor, or a tuple of
    names -> a vector): one ``torch.cat`` per device, whatever the number of values.
    """

    __slots__ = ("flats", "host", "names")

    def __init__(self, values: dict[Any, Any]):
        self.host: list[Part] = []
        #: per device: the names and 0-d tensors (stacked at once), the names and vectors
        by_device: dict[torch.device, tuple[list[str], list[torch.Tensor], list[str],
                                            list[torch.Tensor]]] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                group = by_device.get(value.device)
                if group is None:
                    group = by_device[value.device] = ([], [], [], [])
                if type(key) is tuple:
                    group[2].extend(key)
                    group[3].append(value if value.dim() == 1 else value.reshape(-1))
                else:
                    group[0].append(key)
                    group[1].append(value)
            elif type(key) is tuple:  # a vector on the host: a numpy array or a sequence
                self.host.append((key, value if isinstance(value, np.ndarray)
                                  else [float(v) for v in value]))
            else:
                self.host.append(((key,), (float(value),)))
        self.names = [(*scalar_names, *vector_names)
                      for scalar_names, _, vector_names, _ in by_device.values()]
        with torch.no_grad():
            self.flats = [_flat(scalars, vectors) for _, scalars, _, vectors
                          in by_device.values()]

    @classmethod
    def vectors(cls, names: list[tuple[str, ...]], flats: list[torch.Tensor]) -> Packed:
        """Vectors packed already: ``flats[i]`` holds the columns ``names[i]``."""
        packed = cls.__new__(cls)
        packed.host, packed.names, packed.flats = [], names, flats
        return packed

    def floats(self, arrays: list[np.ndarray]) -> dict[str, float]:
        """``{column: float}``, given ``flats`` read (:func:`read_arrays`)."""
        out: dict[str, float] = {}
        for names, values in self.parts(arrays):
            out.update(zip(names, np.asarray(values, dtype=np.float64).tolist(), strict=True))
        return out

    def parts(self, arrays: list[np.ndarray]) -> list[Part]:
        """The columns, given ``flats`` read (:func:`read_arrays`)."""
        return [*self.host, *zip(self.names, arrays, strict=True)]


def _flat(scalars: list[torch.Tensor], vectors: list[torch.Tensor]) -> torch.Tensor:
    """0-d tensors and vectors as one new vector (a copy, whatever a probe does later with
    its buffers), in as few operations as there are vectors."""
    if not vectors:
        return torch.stack(scalars)
    return torch.cat([torch.stack(scalars), *vectors] if scalars else vectors)


_NUMPY_FLOATS = (torch.float32, torch.float64)


def read_arrays(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor's values on the host (a flat numpy array), read with one transfer per
    device: the tensors of a device concatenated and copied at once (one synchronisation on
    an accelerator; on a CPU the copy is the concatenation)."""
    if len(tensors) == 1:  # the usual step: its values packed already
        return [_host(tensors[0].detach().reshape(-1))]
    out: list[np.ndarray | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        host = _host(torch.cat([tensors[i].detach().reshape(-1) for i in indices])
                     if len(indices) > 1 else tensors[indices[0]].detach().reshape(-1))
        at = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = host[at:at + n]
            at += n
    return out  # type: ignore[return-value]


def _host(flat: torch.Tensor) -> np.ndarray:
    """A flat tensor's values as a numpy array: the step's one read from its device."""
    if flat.dtype not in _NUMPY_FLOATS:
        flat = flat.double()
    return (flat if flat.device.type == "cpu" else flat.cpu()).numpy()


class Pending:
    """Tensors copied from the device without waiting, read once the copy has completed.

    The tensors are packed into one float64 vector per device and copied into a host buffer
    with ``non_blocking=True`` (pinned memory on a GPU, with an event recorded after the copy):
    nothing here waits for the device. Reading them (:meth:`result`) a step later waits only
    for a copy that has long finished, so the CPU never stops queueing work to read a step's
    statistics. On a CPU they are read as they are (the copy would be immediate).
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self._tensors: list[torch.Tensor] | None = None
        #: per device: the host buffer, the event after its copy (a GPU's), the tensors'
        #: positions and sizes
        self.copies: list[tuple[torch.Tensor, Any, list[tuple[int, int]]]] = []
        self._count = len(tensors)
        if all(t.device.type == "cpu" for t in tensors):
            self._tensors = tensors
            return
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        for device, indices in by_device.items():
            flat = torch.cat([tensors[i].detach().reshape(-1).double() for i in indices])
            gpu = device.type == "cuda"
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=gpu)
            host.copy_(flat, non_blocking=True)
            event = None
            if gpu:
                event = torch.cuda.Event()
                event.record()
            self.copies.append((host, event, [(i, tensors[i].numel()) for i in indices]))

    def result(self) -> list[np.ndarray]:
        """Each tensor's values (a flat numpy array), once every copy has completed."""
        if self._tensors is not None:
            return read_arrays(self._tensors)
        out: list[np.ndarray | None] = [None] * self._count
        for host, event, items in self.copies:
            if event is not None:
                event.synchronize()
            values = host.numpy()
            at = 0
            for i, n in items:
                out[i] = values[at:at + n]
                at += n
        return out  # type: ignore[return-value]
