"""Run configuration: nested dataclasses, TOML in and out, dotted ``--set`` overrides.

Layers apply in this order, later ones winning: the defaults below, a named preset, a TOML file
(``--config``), then ``--set section.key=value`` overrides and the command's own flags. Unknown keys
and wrong types are errors (:class:`~vaediag.errors.ConfigError`), never silently ignored. Every
field's ``help`` text is what ``vaediag config`` prints and what docs/configuration.md lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from vaediag.config_checks import validate
from vaediag.errors import ConfigError
from vaediag.inject import KINDS as FAULT_KINDS
from vaediag.presets import PRESETS

#: the choices of ``probes.preset``: :data:`vaediag.probes.PRESETS`, written out for the type
#: checker (a test keeps the two the same)
ProbePreset = Literal["off", "cheap", "standard", "full"]
PROBE_PRESETS: tuple[str, ...] = typing.get_args(ProbePreset)


def _either(choices: typing.Iterable[str]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [f"'{c}'" for c in choices]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    source: str = opt("toyfaces", "'toyfaces' (built in, offline), a folder of images (searched "
                      "recursively), or a .npz/.npy array of images")
    resolution: int = opt(64, "images are centre-cropped and resized to this square size (px)")
    toyfaces_size: int = opt(8192, "toyfaces only: number of training images generated")
    max_images: int = opt(0, "folders and arrays: use at most this many images (0 = all), "
                          "picked by a seeded shuffle")
    val_size: int = opt(256, "images held out for validation, never trained on; the first 8 are "
                        "the grid's")
    seed: int = opt(0, "seed of the toyfaces generator and of the train/validation split; kept "
                    "apart from train.seed so the data stays fixed while training seeds vary")


@dataclass
class ModelConfig:
    channels: tuple[int, ...] = opt((32, 48, 64, 128), "encoder conv widths, one stride-2 conv "
                                    "each; the decoder mirrors them. data.resolution must be "
                                    "divisible by 2**len(channels)")
    latent_dim: int = opt(32, "size of z")
    norm: Literal["none", "batch", "group"] = opt("none", "normalisation after each hidden conv")
    group_norm_groups: int = opt(8, "groups for norm = 'group' (must divide every width)")
    activation: Literal["relu", "leaky_relu", "silu"] = opt("relu", "hidden activation")


@dataclass
class LossConfig:
    recon: Literal["bce", "mse_sum", "mse_mean", "gaussian"] = opt(
        "bce", "reconstruction term: 'bce' = BCE-with-logits summed over pixels on [0,1] targets "
        "(as in the TensorFlow CVAE tutorial); 'mse_sum' / 'mse_mean' on sigmoid outputs; "
        "'gaussian' = negative log-likelihood of N(sigmoid output, decoder_scale^2)")
    decoder_scale: float = opt(0.1, "gaussian only: the decoder's standard deviation, or its "
                               "initial value when learned")
    learn_decoder_scale: bool = opt(False, "gaussian only: learn one shared decoder scale "
                                    "(sigma-VAE); as it shrinks the effective KL weight falls")
    kl: Literal["analytic", "mc"] = opt("analytic", "'analytic' closed form, or 'mc' = the "
                                        "single-sample Monte Carlo estimate log q(z|x) - log p(z) "
                                        "(as in the TensorFlow CVAE tutorial)")
    beta: float = opt(1.0, "weight of the KL term (after the schedule below)")
    beta_schedule: Literal["constant", "warmup", "cyclical"] = opt(
        "constant", "'warmup' ramps beta linearly from 0 over beta_warmup_steps; 'cyclical' "
        "repeats a ramp every beta_cycle_steps (Fu et al. 2019)")
    beta_warmup_steps: int = opt(0, "steps of the linear KL warm-up")
    beta_cycle_steps: int = opt(1000, "cyclical: length of one cycle in steps")
    beta_cycle_ratio: float = opt(0.5, "cyclical: fraction of each cycle spent ramping up")
    free_bits: float = opt(0.0, "nats per latent dimension below which a dimension's "
                           "batch-mean KL is not penalised (Kingma et al. 2016); 0 = off")
    logvar_clamp: tuple[float, ...] = opt((), "[min, max] to clamp the encoder's log-variance, "
                                          "e.g. [-30.0, 20.0]; empty = no clamp")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = opt("adam", "optimizer ('sgd' with momentum: a "
                                                "replay that asks whether Adam is to blame)")
    lr: float = opt(1e-3, "peak learning rate")
    betas: tuple[float, ...] = opt((0.9, 0.999), "Adam's beta1, beta2")
    momentum: float = opt(0.9, "sgd only: momentum")
    eps: float = opt(1e-8, "Adam's epsilon, added to sqrt(v)")
    weight_decay: float = opt(0.0, "L2 penalty (adam) or decoupled weight decay (adamw)")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value; 0 = off")
    schedule: Literal["constant", "cosine", "step"] = opt("constant", "learning-rate schedule "
                                                           "after warm-up")
    warmup_steps: int = opt(0, "linear learning-rate warm-up from 0 over this many steps")
    min_lr_ratio: float = opt(0.0, "cosine: final lr as a fraction of lr")
    step_every: int = opt(1000, "step: multiply the lr by step_gamma every this many steps")
    step_gamma: float = opt(0.5, "step: factor applied every step_every steps")


@dataclass
class TrainConfig:
    steps: int = opt(0, "optimizer steps to train; 0 = use epochs")
    epochs: int = opt(10, "epochs to train when steps = 0")
    batch_size: int = opt(64, "images per step (per rank under torchrun: the global batch is "
                          "batch_size x ranks); the last partial batch of an epoch is dropped")
    seed: int = opt(0, "seed of initialisation, data order, sampling and the grid's fixed z")
    device: str = opt("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    on_nonfinite: Literal["stop", "skip", "continue"] = opt(
        "stop", "when a loss term or gradient is NaN/Inf: 'stop' (checkpoint and exit), 'skip' "
        "the update, or 'continue'; every occurrence is recorded as an event. With 'continue' "
        "and no optim.grad_clip nothing waits for a step's values (read a step later: no "
        "device synchronisation per step on a GPU)")
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "the forward pass's precision: 'fp32'; 'bf16' (torch.autocast to bfloat16, on "
        "a CPU too); 'fp16' (autocast to float16 with a GradScaler, whose skips and scale are "
        "recorded). The loss terms stay float32; a replay may change it")
    online: bool = opt(True, "run the detectors at each evaluation while training (in a child "
                       "process: training does not wait) and print each new warning or high "
                       "finding as it appears; each is recorded as a 'finding' event")
    stop_on: Literal["never", "warning", "high"] = opt(
        "never", "stop training (checkpoint and exit code 3) when the online analysis finds a "
        "finding of this severity or worse; needs train.online")
    checkpoint_every: int = opt(0, "steps between checkpoints; 0 = at every evaluation, so a "
                                "replay (vaediag replay, analyze --verify) can start near any "
                                "finding")
    keep_checkpoints: int = opt(0, "how many recent checkpoints to keep; 0 = all")
    augment: Literal["none", "flip", "flip_shift"] = opt(
        "none", "augment each training batch: 'flip' left-right at random, 'flip_shift' also "
        "shifted by up to 1/16 of the image size (a replay may change it: a remedy for "
        "memorisation)")
    inject: tuple[str, ...] = opt((), "faults to plant, as KIND@STEP[:key=value,...] (see "
                                  "docs/detectors.md): " + ", ".join(FAULT_KINDS))


@dataclass
class EvalConfig:
    every_steps: int = opt(0, "steps between evaluations (grid + eval losses); 0 = once per epoch")
    recon_mode: Literal["mean", "sample"] = opt(
        "mean", "grid row 2 decodes the posterior mean, or one fixed-noise sample of q(z|x)")


@dataclass
class ProbesConfig:
    preset: ProbePreset = opt(  # noqa: RUF009 - opt() makes the field; ProbePreset a Literal
        "standard", f"what to record beyond the losses: {_either(PROBE_PRESETS)} "
        "(docs/probes.md)")
    extra: tuple[str, ...] = opt((), "more probes to load, as FILE.py:ClassName")
    split_every: int = opt(100, "steps between recon/KL gradient splits (an extra backward pass "
                           "through the encoder; standard, and full at most 10)")
    layer_every: int = opt(1, "steps between per-layer gradient norms (standard and full)")
    optimizer_every: int = opt(4, "steps between Adam-state and update-ratio statistics in the "
                               "standard preset, which also takes them at every step whose "
                               "gradient norm jumps or whose lr or eps jumps by 10% (full: every "
                               "step)")
    metric_images: int = opt(64, "score at most this many validation images at every evaluation, "
                             "for active units and set-level quality (the grid's 8 are always "
                             "scored); 0 = grid only")
    lpips_weights: str = opt("", "torchvision's AlexNet ImageNet weights file for LPIPS; empty = "
                             "look in the torch hub cache")
    lpips_download: bool = opt(False, "let torchvision download the LPIPS backbone weights when "
                               "they are not found")


@dataclass
class LogConfig:
    flush_steps: int = opt(50, "write buffered per-step rows at least every this many steps")
    flush_seconds: float = opt(5.0, "... and at least this often: a run killed with SIGKILL "
                               "loses at most this much")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            section.name: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(self, section.name)).items()
            }
            for section in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


_SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


@functools.cache
def _section_types() -> dict[str, dict[str, Any]]:
    out = {}
    for name in _SECTIONS:
        cls = type(getattr(Config(), name))
        hints = typing.get_type_hints(cls)
        out[name] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return out


def all_keys() -> list[tuple[str, Any, str]]:
    """Every config key as (dotted name, default, help), in declaration order."""
    default = Config()
    keys = []
    for name in _SECTIONS:
        section = getattr(default, name)
        for f in dataclasses.fields(section):
            keys.append((f"{name}.{f.name}", getattr(section, f.name), f.metadata["help"]))
    return keys


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


#: the plain types a key may have: (does a value fit, what it must be, its canonical form)
_SCALARS: dict[type, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number",
            float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}


def _coerce(key: str, value: Any, kind: Any, source: str) -> Any:
    """Check ``value`` against the annotated type ``kind``; return it in canonical form."""
    where = f"{source}: {key}"
    origin = typing.get_origin(kind)
    if kind in _SCALARS:
        fits, what, canonical = _SCALARS[kind]
        if not fits(value):
            raise ConfigError(f"{where} must be {what}, got {_describe(value)}")
        return canonical(value)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, "
                              f"got {_describe(value)}")
        return value
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_describe(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, item_kind, source) for i, v in enumerate(value))
    raise TypeError(f"unsupported config type {kind!r} for {key}")  # a bug in this module


#: what other tools call a key: ``optim.learning_rate`` suggests ``optim.lr``, not the key
#: spelled most alike (``optim.min_lr_ratio``)
ALIASES = {"learning_rate": "lr", "learningrate": "lr", "epsilon": "eps", "kl_weight": "beta",
           "beta_kl": "beta", "z_dim": "latent_dim", "latent_size": "latent_dim",
           "latent": "latent_dim", "bs": "batch_size", "batch": "batch_size",
           "num_steps": "steps", "max_steps": "steps", "num_epochs": "epochs",
           "max_epochs": "epochs", "clip": "grad_clip", "gradient_clip": "grad_clip",
           "clip_grad_norm": "grad_clip", "wd": "weight_decay"}


def _unknown(key: str, known: typing.Iterable[str], source: str) -> ConfigError:
    known = list(known)
    section, _, last = key.rpartition(".")
    name = ALIASES.get(last, last)
    alias = None
    if section:  # the same name in its own section, or in another (train.lr: optim.lr)
        alias = f"{section}.{name}" if f"{section}.{name}" in known else \
            next((k for k in known if k.endswith(f".{name}")), None)
    close = [alias] if alias else difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}; 'vaediag config' lists them all")


def _merge(base: dict[str, dict[str, Any]], update: dict[str, Any], source: str) -> None:
    """Merge a nested {section: {key: value}} dict into ``base``, rejecting unknown keys."""
    types_ = _section_types()
    dotted = [k for k, _, _ in all_keys()]
    for section, values in update.items():
        if section not in types_:
            raise _unknown(section, dotted + list(types_), source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, "
                              f"got {_describe(values)}")
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in types_[section]:
                raise _unknown(name, dotted, source)
            base[section][key] = _coerce(name, value, types_[section][key], source)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=1e-3"`` -> ("optim", "lr", 0.001). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optim.lr=3e-4")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. optim.lr")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as --set loss.recon=mse_sum
    section, name = key.split(".")
    return section, name, value


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def build_config(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    values: typing.Mapping[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Resolve a :class:`Config` from defaults, a preset, a TOML file, ``--set`` overrides and
    then ``values`` (typed values by dotted key, e.g. ``{"train.steps": 400}``: the command's
    own flags).

    ``base`` replaces the defaults+preset layer (used when resuming from a run's saved config).
    """
    merged = Config().to_dict()
    if base is not None:
        _merge(merged, base, "saved config")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        _merge(merged, PRESETS[preset], f"preset {preset}")
    if file is not None:
        _merge(merged, read_toml(file), str(file))
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(merged, {section: {key: value}}, f"--set {text}")
    for dotted, value in (values or {}).items():
        section, _, key = dotted.partition(".")
        _merge(merged, {section: {key: value}}, dotted)
    return from_dict(merged, source="config")


#: Keys a resumed run may not change: they define the data, the model's shape or the data order.
RESUME_LOCKED = ("data.", "model.", "train.seed", "train.batch_size", "loss.recon",
                 "loss.decoder_scale", "loss.learn_decoder_scale")


def resume_changes(saved: Config, new: Config, what: str = "--resume") -> dict[str, list[Any]]:
    """What ``new`` changes from a run's saved config, ``{key: [old, new]}``; a
    :class:`ConfigError` when it changes a key a resumed run (or a replay: ``what`` says which)
    may not (``RESUME_LOCKED``)."""
    a, b = saved.to_dict(), new.to_dict()
    changes = {f"{s}.{k}": [a[s][k], b[s][k]] for s in a for k in a[s] if a[s][k] != b[s][k]}
    locked = [k for k in changes if k.startswith(RESUME_LOCKED)]
    if locked:
        raise ConfigError(f"{what} cannot change {', '.join(locked)}: they fix the data, the "
                          f"model or the data order; start a new run instead")
    return changes


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a :class:`Config` from a complete or partial nested dict."""
    merged = Config().to_dict()
    _merge(merged, values, source)
    sections = {}
    for name in _SECTIONS:
        cls = type(getattr(Config(), name))
        sections[name] = cls(**merged[name])  # values were coerced by _merge
    config = Config(**sections)
    validate(config)
    return config


def annotated_toml(config: Config) -> str:
    """The config as TOML with each key's help as a comment: what ``vaediag config`` prints."""
    helps = {k: h for k, _, h in all_keys()}
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {helps[f'{section}.{key}']}")
            lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The table of every key for docs/configuration.md (a test keeps the two identical)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in all_keys():
        shown = list(default) if isinstance(default, tuple) else default
        value = tomli_w.dumps({"v": shown})[4:].strip()
        lines.append(f"| `{key}` | `{value}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Config", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig",
    "EvalConfig", "LogConfig", "PRESETS", "ProbesConfig", "RESUME_LOCKED", "build_config",
    "from_dict", "resume_changes",
    "parse_override", "all_keys", "annotated_toml", "validate", "read_toml", "reference_markdown",
]
