"""The severities of a finding, least to most severe.

A module of its own, importing nothing, so that what names them (the command line's
``--fail-on``, the Monitor's ``stop_on``) does not load the analysis and its detectors."""

from __future__ import annotations

SEVERITIES = ("info", "warning", "high")


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for high."""
    return SEVERITIES.index(severity)


__all__ = ["SEVERITIES", "severity_rank"]
