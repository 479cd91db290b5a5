"""tqdm progress bars for ``wait``/``map``/the decorator."""

from __future__ import annotations

__all__ = ["bar"]


def bar(total: int):
    """A tqdm bar counting finished jobs."""
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="job")
