"""Parameters grouped into layers and parts: the index every per-layer statistic sums with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class LayerIndex:
    """Parameters grouped into layers (a module's own parameters) and parts (top-level modules).

    ``decoder.fc.weight`` and ``decoder.fc.bias`` form layer ``decoder.fc`` in part ``decoder``;
    a parameter not named weight/bias is a layer of its own (``decoder.log_scale``).
    """

    param_names: list[str]
    layers: list[str]
    parts: list[str]
    param_layer: torch.Tensor  # (P,) layer index of each parameter
    layer_part: torch.Tensor  # (L,) part index of each layer
    param_numel: torch.Tensor  # (P,)

    @classmethod
    def from_params(cls, named: list[tuple[str, nn.Parameter]]) -> LayerIndex:
        layers: dict[str, int] = {}
        parts: dict[str, int] = {}
        param_layer, layer_part = [], []
        for pname, _ in named:
            head, _, last = pname.rpartition(".")
            layer = head if last in ("weight", "bias") and head else pname
            if layer not in layers:
                layers[layer] = len(layers)
                part = layer.split(".", 1)[0]
                parts.setdefault(part, len(parts))
                layer_part.append(parts[part])
            param_layer.append(layers[layer])
        return cls(
            param_names=[n for n, _ in named], layers=list(layers), parts=list(parts),
            param_layer=torch.tensor(param_layer, dtype=torch.long),
            layer_part=torch.tensor(layer_part, dtype=torch.long),
            param_numel=torch.tensor([p.numel() for _, p in named], dtype=torch.float64),
        )

    def on(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, copied there once (a copy per step would cost a device
        synchronisation on a GPU)."""
        key = (id(index), device)
        cache = self.__dict__.setdefault("_on_device", {})
        if key not in cache:
            cache[key] = index.to(device)
        return cache[key]

    def _group_sum(self, values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
        out = torch.zeros((groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.on(index, values.device), values)

    def per_layer_sum(self, per_param: torch.Tensor) -> torch.Tensor:
        """Sum a (P, ...) per-parameter quantity into (L, ...) per-layer totals."""
        return self._group_sum(per_param, self.param_layer, len(self.layers))

    def per_layer_sum_host(self, per_param: np.ndarray) -> np.ndarray:
        """:meth:`per_layer_sum` of a (P,) vector on the host."""
        return np.bincount(self._host("param_layer"), per_param, len(self.layers))

    def per_part_sum_host(self, per_layer: np.ndarray) -> np.ndarray:
        """:meth:`per_part_sum` of a (L,) vector on the host."""
        return np.bincount(self._host("layer_part"), per_layer, len(self.parts))

    def _host(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_numpy", {})
        if name not in cache:
            cache[name] = getattr(self, name).numpy()
        return cache[name]

    def per_part_sum(self, per_layer: torch.Tensor) -> torch.Tensor:
        """Sum a (L, ...) per-layer quantity into (parts, ...) per-part totals."""
        return self._group_sum(per_layer, self.layer_part, len(self.parts))
