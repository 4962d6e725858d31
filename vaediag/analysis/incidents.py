"""Incidents: findings that share a root cause, told as one story, and severity from harm.

A planted 30x learning-rate jump is seen by four detectors (the step size jumps, the update is
oversized, the loss spikes, the gradients explode) and a user needs one answer: the learning
rate, and what it set off. An incident is that answer: its *root* (the earliest finding of the
chain), its *consequences* in time order with their delays, and the root's remedies.

When one finding follows another
    An effect follows its cause within :data:`WINDOW` steps (the timeline's look-back). Within
    one step, the step's own order decides: the loss of the forward pass, the latents, the
    gradients of the backward pass, the optimizer's state, the update it makes
    (:data:`~vaediag.analysis.kinds.STAGES`). Findings seen only by comparing evaluations
    (stage ``evaluation``: drift, decoupling, overfitting) happened somewhere after the
    evaluation at their first step: one follows an event from ``WINDOW`` steps before that
    evaluation up to the next evaluation, and two of them that start at the same evaluation, or
    come from one detector with overlapping spans, are one change of the pictures.

    The window is 50 steps because a cause inside training acts within a few steps: an update
    changes the next step's loss, Adam's first moment forgets at ``1 - beta1`` (10 steps at
    0.9), so what a bad step sets off shows within a few of those memory lengths. A condition
    that held for hundreds of steps without harm did not cause harm that came later: what
    changed near the harm did.

Severity from harm (:func:`grade`)
    Harm is measured, not presumed: a loss spike that cost steps' worth of loss, a KL
    explosion, a non-finite value, a posterior collapse that cost picture quality, pictures that
    got worse at the next evaluation, a loss that stopped tracking quality (kinds declared
    ``harm``, at warning or above). A *risk* (a gradient explosion, a step-size jump, saturated
    log-variances, ...) keeps its warning or high only when harm follows it; otherwise it is
    ``info`` and says that no harm followed. A *condition* (a sustained optimizer state) is
    ``info`` until harm follows its onset within the window, and then says "followed by".
"""

from __future__ import annotations

import bisect
import functools

from vaediag.analysis.detectors import KINDS
from vaediag.analysis.findings import Finding, Incident, severity_rank
from vaediag.analysis.kinds import STAGES

WINDOW = 50
#: a change of the pictures seen over at most this many evaluation intervals (its tightest
#: pair) is sudden enough to have been set off by an event between them; one that took longer
#: to show was set off only by an event in the interval just before it was seen
SUDDEN_INTERVALS = 4


def _stage(f: Finding) -> int:
    return STAGES.index(KINDS[f.kind].stage)


def _seen_after(incident: Incident, f: Finding) -> tuple[int, tuple[int, int, int, int]]:
    """A consequence's place in its incident: its delay after the root, then :func:`_order`."""
    return incident.after_steps(f), _order(f)


def _order(f: Finding) -> tuple[int, int, int, int]:
    """Time order; at one step the step's own order, then what the loss missed before how the
    pictures moved (a decoupling names the quality lost, drift only that it changed), then the
    detector's ranking."""
    kind = KINDS[f.kind]
    return f.first_step, _stage(f), 0 if kind.decoupling else 1, kind.instability or 99


def _at_evaluations(f: Finding) -> bool:
    return KINDS[f.kind].stage == "evaluation"


def follows(effect: Finding, cause: Finding, eval_steps: list[int]) -> bool:
    """Whether ``effect`` is close enough after ``cause`` to be its consequence.

    Only events of weight cause others: a cause at warning or above, or a condition or risk
    followed by harm (which grading then weighs); an ``info`` event (a spike that cost
    nothing, an unused dimension) is the cause of ``info`` findings only, and what the
    evaluations show follows only a cause at warning or above.
    """
    if effect is cause:
        return False
    if severity_rank(cause.severity) == 0 and severity_rank(effect.severity) >= 1:
        # an info cause: a condition or risk may be followed by harm (what grading then
        # weighs); it is not the root of another warning, which has a cause of its own
        graded = KINDS[cause.kind].condition or KINDS[cause.kind].risk
        if not (graded and KINDS[effect.kind].harm):
            return False
    if _at_evaluations(effect):
        if _at_evaluations(cause):
            # one change of the pictures: seen from the same evaluation on, or twice by one
            # detector over overlapping spans
            return (effect.first_step == cause.first_step
                    or (effect.detector == cause.detector
                        and cause.first_step <= effect.last_step
                        and effect.first_step <= cause.last_step))
        # what the pictures show is set off by an event of weight, not by a sustained state,
        # that came where the change did: from shortly before its first evaluation to the
        # evaluation it was seen at (for a loss-quality finding, between the two evaluations
        # of the tightest pair that shows it)
        start, seen = _span(effect, eval_steps)
        return severity_rank(cause.severity) >= 1 and start - WINDOW <= cause.first_step <= seen
    if _at_evaluations(cause):
        return False  # an evaluation's finding is seen after the fact: it causes nothing
    return 0 <= effect.first_step - cause.first_step <= WINDOW and _order(cause) < _order(effect)


def _span(f: Finding, eval_steps: list[int]) -> tuple[int, int]:
    """Where a change seen at evaluations happened: the tightest pair of evaluations that shows
    it (loss-quality findings record it), else from its first step to the evaluation after."""
    tight = f.evidence.get("tightest") if KINDS[f.kind].decoupling else None
    if isinstance(tight, dict) and "before_step" in tight and "after_step" in tight:
        before, after = int(tight["before_step"]), int(tight["after_step"])
        k = bisect.bisect_left(eval_steps, after)
        if k - bisect.bisect_left(eval_steps, before) <= SUDDEN_INTERVALS:
            return before, after
        # a slower change: an event of weight in the interval just before it was seen is
        # still the nearest cause of what that evaluation showed
        return (eval_steps[k - 1] if k > 0 else before), after
    return f.first_step, seen_at(f, eval_steps)


def seen_at(f: Finding, eval_steps: list[int]) -> int:
    """The step a finding could first be seen: its first step, or for one seen by comparing
    evaluations the evaluation after its first step (the change happened in between)."""
    if not _at_evaluations(f):
        return f.first_step
    k = bisect.bisect_right(eval_steps, f.first_step)
    return eval_steps[k] if k < len(eval_steps) else f.last_step


def group(findings: list[Finding], eval_steps: list[int]) -> list[Incident]:
    """Every finding in exactly one incident; incidents in time order of their roots.

    Findings seen at steps are taken in time order: each joins the incident of the latest
    finding it follows, or starts one. Findings seen at evaluations then join the incident of
    the earliest finding they follow (the root of what they show), or start one.
    """
    steps = sorted(eval_steps)
    incidents: list[Incident] = []
    home: dict[int, Incident] = {}
    by_step = sorted((f for f in findings if not _at_evaluations(f)), key=_order)
    by_eval = sorted((f for f in findings if _at_evaluations(f)), key=_order)
    for f in by_step + by_eval:
        placed = [m for i in incidents for m in i.members if follows(f, m, steps)]
        events = [m for m in placed if not _at_evaluations(m)]
        if placed:
            # at steps: the latest event it follows; at evaluations: the earliest event it
            # follows (the root of what the pictures show), else what the same detector saw
            cause = max(placed, key=_order) if not _at_evaluations(f) else \
                min(events or placed, key=_order)
            incident = home[id(cause)]
            incident.consequences.append(f)
            incident.seen_at[id(f)] = _span(f, steps)[1]
        else:
            incident = Incident(root=f)
            incidents.append(incident)
        home[id(f)] = incident
    for incident in incidents:  # in the order they were seen
        incident.consequences.sort(key=functools.partial(_seen_after, incident))
    return sorted(incidents, key=lambda i: _order(i.root))


def grade(incidents: list[Incident], eval_steps: list[int]) -> None:
    """Severity from harm, in place (see the module's docstring)."""
    steps = sorted(eval_steps)
    for incident in incidents:
        members = incident.members
        harms = [h for h in members if KINDS[h.kind].harm and severity_rank(h.severity) >= 1]
        for f in members:
            kind = KINDS[f.kind]
            if not (kind.condition or kind.risk):
                continue
            # harm that began after its onset (a change seen at evaluations: after the
            # evaluation the change is measured from)
            after = sorted((h for h in harms if h is not f and follows(h, f, steps)
                            and (h.first_step > f.first_step
                                 or (_at_evaluations(h) and h.first_step == f.first_step))),
                           key=_order)
            # a risk set off by harm is part of that harm's story, not a harmless risk
            caused_by_harm = any(follows(f, h, steps) for h in harms if h is not f)
            if after:
                if f.severity == "info" and kind.condition:
                    f.severity = "warning"
                    f.summary += (f"; followed by a {after[0].kind.replace('_', ' ')} at step "
                                  f"{after[0].first_step:,}")
                f.evidence["followed_by"] = {"kind": after[0].kind, "step": after[0].first_step}
            elif kind.risk and f.severity != "info" and not caused_by_harm:
                f.evidence["severity_before_harm_check"] = f.severity
                f.severity = "info"
                f.summary += (f"; a risk only: no harm followed within {WINDOW} steps (no loss "
                              f"spike, KL explosion or non-finite value, no worse pictures)")
