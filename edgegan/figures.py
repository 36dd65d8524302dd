"""How quality figures read to a person, in one place for the server's log, the live views and the CLI:
scalars as short numbers, and each class's share of the samples (a list) as the range it spans."""

from __future__ import annotations

from collections.abc import Mapping


def quality_text(quality: Mapping[str, object], digits: int = 3) -> str:
    """e.g. "fid 31.4, classes 10, is 8.91, shares 7-13%" (None values are left out)."""
    parts = []
    for name, value in quality.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            shares = [float(share) for share in value if isinstance(share, int | float)]
            if shares:
                parts.append(f"shares {min(shares):.0%}-{max(shares):.0%}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.{digits}g}")
        else:
            parts.append(f"{name} {value}")
    return ", ".join(parts)
