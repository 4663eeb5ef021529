"""A tqdm progress bar where asked for (tqdm is a dependency, but an environment without it loses
only the bar), else the items as they are."""
from __future__ import annotations


def progress_bar(items, desc: str, unit: str, enabled: bool = True):
    """``items`` wrapped in a tqdm bar labelled ``desc`` counting ``unit``s, or ``items`` itself when
    not ``enabled`` or without tqdm."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit)
