"""The mapping parameters as a user types them on a command line, read one way for every CLI.

``atlas map`` and ``jobs/map_query.py`` both read ``--levels``, ``--predict`` and ``--thresholds``
here, so the same text means the same thing to both (they had drifted: the job took
``--predict none`` for a modality named "none" and refused ``LEVEL=NUMBER,…`` thresholds).
"""

from __future__ import annotations

from atlas.mapping.align import MappingError


def names_from_text(value: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; ``None`` (not given) → None (the default); ``"none"`` or ``""`` → ``[]``."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return [] if names in ([], ["none"]) else names


def thresholds_from_text(value: str, option: str = "--thresholds") -> str | float | dict[str, float] | None:
    """``calibrated`` | ``none`` | one number for every level | ``LEVEL=NUMBER,LEVEL=NUMBER``."""
    text = value.strip()
    if text.lower() in ("calibrated", "none"):
        return None if text.lower() == "none" else "calibrated"
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for item in text.split(","):
        level, sep, number = item.partition("=")
        try:
            out[level.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not level.strip():
            raise MappingError(f"{option} {value!r}: expected calibrated, none, a number or LEVEL=NUMBER,...")
    return out
