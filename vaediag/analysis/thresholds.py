"""Every detector's thresholds, read from its module: the tables in docs/detectors.md are made
here (``python -m vaediag.analysis.thresholds --write docs/detectors.md``) and a test checks the
page holds them, as docs/configuration.md holds ``vaediag config --markdown``.

A threshold is a module-level constant in upper case holding a number; what it means is the
``#:`` comment above it or the ``#`` comment after it. A detector's constant without one fails
the test: no threshold goes undocumented.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from pathlib import Path
from types import ModuleType

from vaediag.analysis.detectors import DETECTORS


def thresholds(module: ModuleType) -> list[tuple[str, float | int, str]]:
    """(name, value, meaning) of each numeric module-level constant, in source order; the
    meaning is "" when the source says nothing."""
    source = inspect.getsource(module)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string
    lines = source.splitlines()
    out = []
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 \
            else node.target if isinstance(node, ast.AnnAssign) else None
        if not isinstance(target, ast.Name) or not target.id.isupper() \
                or target.id == "ORDER":  # a place among the detectors, not a threshold
            continue
        value = getattr(module, target.id, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        meaning: list[str] = []
        above = node.lineno - 1
        while above >= 1 and lines[above - 1].lstrip().startswith("#:"):
            meaning.insert(0, lines[above - 1].lstrip()[2:].strip())
            above -= 1
        trailing = comments.get(node.end_lineno or node.lineno, "")
        if not meaning and trailing.startswith("#"):
            meaning.append(trailing.lstrip("#:").strip())
        out.append((target.id, value, " ".join(meaning)))
    return out


def markdown() -> str:
    """One table per detector: constant, value, meaning."""
    parts = []
    for module in DETECTORS:
        rows = thresholds(module)
        if not rows:
            continue
        parts.append(f"### `{module.NAME}` thresholds\n\n"
                     "| constant | value | meaning |\n|---|---|---|")
        parts += [f"| `{name}` | {value:g} | {meaning.replace('|', '/')} |"
                  for name, value, meaning in rows]
        parts.append("")
    return "\n".join(parts)


def shortest_runs(eval_every: int) -> dict[str, int]:
    """{analysis: the fewest steps a run needs for it to run at all}, with an evaluation every
    ``eval_every`` steps: what a run shorter than that lists under "not checked"."""
    from vaediag.analysis.data import MIN_BURN_IN
    from vaediag.analysis.detectors import (
        decoupling,
        epoch_average,
        generalisation,
        kl_explosion,
    )

    # the first evaluation at or after the burn-in, then as many more as each needs
    first = -(-MIN_BURN_IN // eval_every) * eval_every

    def evaluations(n: int) -> int:
        return first + (n - 1) * eval_every

    return {
        "loss spikes": MIN_BURN_IN + 20,
        "KL explosion": MIN_BURN_IN + kl_explosion.MIN_STABLE + kl_explosion.MIN_PERSIST,
        "loss-quality decoupling": evaluations(decoupling.MIN_EVALS),
        "overfitting (with train_images=)": evaluations(generalisation.MIN_EVALS),
        "the epoch-average trap": evaluations(epoch_average.MIN_EVALS),
    }


def shortest_runs_markdown(eval_every: tuple[int, ...] = (20, 50, 100, 250)) -> str:
    """:func:`shortest_runs` as a table, one column per evaluation interval."""
    head = "| analysis | " + " | ".join(f"eval_every={e}" for e in eval_every) + " |"
    rows = [head, "|---" * (len(eval_every) + 1) + "|"]
    tables = [shortest_runs(e) for e in eval_every]
    for name in tables[0]:
        rows.append(f"| {name} | " + " | ".join(f"{t[name]:,}" for t in tables) + " |")
    return "\n".join(rows) + "\n"


def write(path: Path) -> bool:
    """Replace the threshold tables in ``path`` (docs/detectors.md: from its first table after
    "## Thresholds" up to the next section) with :func:`markdown`; whether it changed."""
    text = path.read_text()
    start = text.index("### `", text.index("## Thresholds"))
    end = text.index("\n## ", start)
    new = text[:start] + markdown() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        changed = write(Path(sys.argv[2]))
        print(f"{sys.argv[2]}: {'updated' if changed else 'already up to date'}")
    else:
        print(markdown(), end="")
