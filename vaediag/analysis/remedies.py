"""Remedies checked against the run's configuration: never advise what the run already does.

A remedy of a ``vaediag train`` run names the setting it changes (``(--set loss.kl=analytic)``,
or ``(optim.grad_clip)`` where the value is the user's to choose; :func:`causes.knob`). Each
setting a remedy can name has a rule here saying when the run's configuration already applies
it. An applied remedy is dropped; a remedy the run applies in part ("clip gradients" in a run
that clips at 100) says so and asks for more. A remedy that undoes a recorded change ("set eps
back to 1e-8") is about the change, not the configuration, and is kept.

A test reads every literal ``knob(data, KEY, VALUE)`` in the detectors and checks that a rule
covers it, so a new remedy cannot skip this check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vaediag.analysis.data import RunData
from vaediag.analysis.findings import Finding

KNOB = re.compile(r" \((?:--set )?([a-z_]+\.[a-z_0-9]+)(?:=([^)]*))?\)")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _equal(current: Any, suggested: str) -> bool:
    return str(current).lower() == suggested.strip().lower()


def _at_least(current: Any, suggested: str) -> bool:
    c, s = _number(current), _number(suggested)
    return c is not None and s is not None and c >= s


def _set(current: Any, suggested: str) -> bool:
    return bool(current)


def _clips_at_most(current: Any, suggested: str) -> bool:
    c, s = _number(current), _number(suggested)
    return c is not None and c > 0 and s is not None and c <= s


#: key -> (applied(current, suggested value) for a remedy naming a value, note for a remedy
#: naming only the key when the run already uses it (``None``: such a remedy is directional,
#: "lower the learning rate", and always applies))
RULES: dict[str, tuple[Callable[[Any, str], bool], Callable[[Any], str | None] | None]] = {
    "loss.kl": (_equal, None),
    "loss.logvar_clamp": (_set, None),
    "loss.free_bits": (_at_least, lambda v: f"it already uses {v:g} nats: raise them"
                       if _number(v) else None),
    "loss.beta_schedule": (_equal, None),
    "loss.beta_warmup_steps": (_at_least, lambda v: f"it already warms up over {int(v):,} "
                               "steps: longer" if _number(v) else None),
    "loss.learn_decoder_scale": (_equal, None),
    "optim.schedule": (_equal, None),
    "optim.grad_clip": (_clips_at_most, lambda v: f"it already clips at {v:g}: clip lower"
                        if _number(v) else None),
    "optim.warmup_steps": (_at_least, lambda v: f"it already warms up over {int(v):,} steps: "
                           "longer" if _number(v) else None),
    "optim.eps": (_at_least, None),
    "optim.weight_decay": (_at_least, None),
    "optim.name": (_equal, None),
    "train.augment": (_equal, None),
    "train.precision": (_equal, None),
    "model.activation": (_equal, None),
    "model.norm": (_equal, None),
}
#: settings whose remedies are directional ("lower the learning rate", "a smaller latent
#: space"): the value is the user's to choose and such a remedy always applies
DIRECTIONAL = frozenset({"optim.lr", "optim.betas", "loss.beta", "model.latent_dim"})
#: remedies that answer a recorded change (their value is the one before it) are kept
UNDOES_A_CHANGE = re.compile(r"\bback\b|\bbefore\b|\bstop the KL weight\b", re.IGNORECASE)


def current(data: RunData, key: str) -> Any:
    section, _, name = key.partition(".")
    return data.setting(section, name)


def check(remedy: str, data: RunData) -> str | None:
    """The remedy as it applies to this run: unchanged, with a note of what the run already
    does, or ``None`` when the run already applies it."""
    for match in KNOB.finditer(remedy):
        key, value = match.group(1), match.group(2)
        rule = RULES.get(key)
        now = current(data, key)
        if rule is None or now is None:
            continue
        applied, note = rule
        if value is not None:
            if UNDOES_A_CHANGE.search(remedy[:match.start()]):
                continue
            if applied(now, value):
                return None
        elif note is not None and _number(now):
            text = note(now)
            if text:
                remedy = remedy[:match.end() - 1] + f"; {text}" + remedy[match.end() - 1:]
    return remedy


def check_all(findings: list[Finding], data: RunData) -> None:
    """Each finding's remedies checked against the run's configuration, in place; what was
    dropped is kept in the evidence (``remedies_already_applied``)."""
    for f in findings:
        kept, dropped = [], []
        for remedy in f.remedies:
            checked = check(remedy, data)
            if checked is None:
                dropped.append(remedy)
            else:
                kept.append(checked)
        if dropped:
            f.evidence["remedies_already_applied"] = dropped
        f.remedies = kept
