"""Fault injection: plant known faults at known steps, so detectors can be measured.

A fault is written ``KIND@STEP`` or ``KIND@STEP:key=value,key=value`` (``--inject``, config
``train.inject``). Every fault is a function of the step alone, so a resumed run replays it
exactly, and each one is recorded in the run as an ``inject`` event when it starts: the ground
truth that ``benchmarks/detectors.py`` scores the detectors against.

=============  ==========================================  ===================================
kind           what it does                                parameters (default)
=============  ==========================================  ===================================
lr_spike       multiplies the learning rate                factor (10), steps (20)
grad_scale     multiplies every gradient after backward    factor (100), steps (5)
adam_eps       sets Adam's eps                             eps (1e-16), steps (0 = to the end)
ood_batch      trains on out-of-distribution batches       steps (20), source (noise|invert)
desaturate     pulls the decoder's output colours toward   amount (0.6), steps (1)
               grey (a weight edit of its last layer, made
               to the model after STEP updates, and again
               after each of the next steps-1 updates)
nan_grad       puts NaN into one layer's gradient, once    layer (decoder.out)
inf_weight     sets one entry of a layer's weight to +Inf  layer (decoder.fc)
               after STEP updates (a corrupted weight)
beta_scale     multiplies the KL weight (a level shift of  factor (0.02), steps (0 = to the end)
               the KL, not an instability)
fade           the training images fade toward grey, by   amount (0.8), steps (400)
               an amount growing linearly over ``steps``
               steps and held there: a gradual data-
               pipeline fault the optimizer cannot undo
               (the model learns greyer faces; the fixed
               validation images keep their colour)
logvar_jump    adds ``shift`` to the bias of the           shift (12.0)
               encoder's log-variance head after STEP
               updates (a weight edit): in float16,
               exp(logvar) passes 65,504 once logvar
               exceeds 11.1, exp(logvar/2) past 22.2
=============  ==========================================  ===================================

``desaturate`` is the honest way to make loss and quality part: a summed BCE on non-binary
targets is dominated by its entropy floor, so greyer outputs cost little loss but a lot of
colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vaediag.errors import ConfigError

KINDS: dict[str, dict[str, Any]] = {
    "lr_spike": {"factor": 10.0, "steps": 20},
    "grad_scale": {"factor": 100.0, "steps": 5},
    "adam_eps": {"eps": 1e-16, "steps": 0},
    "ood_batch": {"steps": 20, "source": "noise"},
    "desaturate": {"amount": 0.6, "steps": 1},
    "nan_grad": {"layer": "decoder.out"},
    "inf_weight": {"layer": "decoder.fc"},
    "beta_scale": {"factor": 0.02, "steps": 0},
    "fade": {"amount": 0.8, "steps": 400},
    "logvar_jump": {"shift": 12.0},
}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    params: dict[str, Any] = field(default_factory=dict)
    spec: str = ""

    @property
    def last_step(self) -> int | None:
        """The last step the fault acts on; None for 'to the end'."""
        steps = self.params.get("steps")
        if self.kind == "fade":  # a ramp, then held to the end
            return None
        if steps is None:
            return self.step  # one-off faults
        return None if steps == 0 else self.step + int(steps) - 1

    def active(self, step: int) -> bool:
        end = self.last_step
        return self.step <= step and (end is None or step <= end)


def _value(text: str, like: Any, where: str) -> Any:
    try:
        if isinstance(like, bool):
            raise ValueError
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    return text


def parse(spec: str) -> Fault:
    """``"lr_spike@600:factor=10,steps=20"`` -> Fault. Raises ConfigError on bad input."""
    where = f"--inject {spec!r}"
    head, _, tail = spec.partition(":")
    kind, at, step_text = head.partition("@")
    kind = kind.strip()
    if not at or kind not in KINDS:
        raise ConfigError(f"{where}: expected KIND@STEP[:key=value,...] with KIND one of "
                          f"{', '.join(KINDS)}")
    try:
        step = int(step_text)
    except ValueError:
        raise ConfigError(f"{where}: the step must be an integer, got {step_text!r}") from None
    if step < 0:
        raise ConfigError(f"{where}: the step must be >= 0")
    params = dict(KINDS[kind])
    for item in filter(None, (s.strip() for s in tail.split(","))):
        key, eq, text = item.partition("=")
        if not eq or key not in params:
            raise ConfigError(f"{where}: unknown parameter {key!r} for {kind} (it takes "
                              f"{', '.join(KINDS[kind])})")
        params[key] = _value(text.strip(), KINDS[kind][key], where)
    if kind == "ood_batch" and params["source"] not in ("noise", "invert"):
        raise ConfigError(f"{where}: source must be noise or invert")
    if "steps" in params and params["steps"] < 0:
        raise ConfigError(f"{where}: steps must be >= 0")
    return Fault(kind, step, params, spec)


def parse_all(specs: tuple[str, ...] | list[str]) -> list[Fault]:
    return [parse(s) for s in specs]


class Injector:
    """Applies a run's faults inside the training loop (the trainer calls it at fixed points)."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults

    def __bool__(self) -> bool:
        return bool(self.faults)

    def starting(self, step: int) -> list[Fault]:
        return [f for f in self.faults if f.step == step]

    def _factor(self, kind: str, step: int) -> float:
        """The product of the ``factor`` of every fault of ``kind`` active at ``step``."""
        return math.prod(f.params["factor"] for f in self.faults
                         if f.kind == kind and f.active(step))

    def lr_factor(self, step: int) -> float:
        return self._factor("lr_spike", step)

    def beta_factor(self, step: int) -> float:
        return self._factor("beta_scale", step)

    def eps(self, step: int, configured: float) -> float:
        for f in self.faults:
            if f.kind == "adam_eps" and f.active(step):
                return f.params["eps"]
        return configured

    def fade_amount(self, step: int) -> float:
        """How far the training images are faded toward grey at ``step`` (0 before)."""
        amount = 0.0
        for f in self.faults:
            if f.kind == "fade" and step >= f.step:
                ramp = max(1, int(f.params["steps"]))
                amount = max(amount, f.params["amount"] * min(1.0, (step - f.step + 1) / ramp))
        return amount

    def batch(self, step: int, x, generator):
        """The batch to train on: ``x`` itself, faded, or out-of-distribution images."""
        import torch

        a = self.fade_amount(step)
        if a > 0:
            x = (1 - a) * x + a * x.mean(1, keepdim=True)
        for f in self.faults:
            if f.kind == "ood_batch" and f.active(step):
                if f.params["source"] == "invert":
                    return 1.0 - x
                return torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        return x

    def after_update(self, state_step: int, model) -> None:
        """Weight edits of the model after ``state_step`` updates (what an evaluation at
        ``state_step`` shows)."""
        import torch

        for f in self.faults:
            if f.kind == "inf_weight" and f.step == state_step:
                param = _layer_params(model, f)[0]
                with torch.no_grad():
                    param.view(-1)[0] = float("inf")
            if f.kind == "logvar_jump" and f.step == state_step:
                head = model.encoder.fc.bias  # (mu, logvar): its second half
                with torch.no_grad():
                    head[head.numel() // 2:] += f.params["shift"]
            if f.kind == "desaturate" and f.active(state_step):
                out = model.decoder.out
                a = f.params["amount"]
                # Output channels: axis 1 of a transposed convolution's weight, else axis 0.
                weight_axis = 1 if isinstance(out, torch.nn.ConvTranspose2d) else 0
                with torch.no_grad():  # mix each output channel toward the channels' mean
                    for param, axis in ((out.weight, weight_axis), (out.bias, 0)):
                        param.mul_(1 - a).add_(a * param.mean(axis, keepdim=True))

    def after_backward(self, step: int, model) -> None:
        import torch

        for f in self.faults:
            if f.kind == "grad_scale" and f.active(step):
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(f.params["factor"])
            if f.kind == "nan_grad" and f.step == step:
                hits = _layer_params(model, f)
                with torch.no_grad():
                    if hits[0].grad is None:
                        hits[0].grad = torch.zeros_like(hits[0])
                    hits[0].grad.view(-1)[0] = float("nan")


def _layer_params(model, fault: Fault) -> list:
    """The parameters of the layer a fault names (weight first)."""
    layer = fault.params["layer"]
    hits = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] == layer or n == layer]
    if not hits:
        raise ConfigError(f"--inject {fault.spec}: the model has no layer {layer!r}")
    return hits
