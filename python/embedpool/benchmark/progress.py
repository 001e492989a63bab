"""Progress bars (tqdm, on stderr) and the table's rows (stdout), printed so that neither garbles the other."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, label: str, total: int | None, unit: str) -> tqdm[Any]:
        return tqdm(
            total=total,
            desc=label,
            unit=unit,
            leave=False,
            dynamic_ncols=True,
            smoothing=0.1,
            disable=not self.enabled,
            file=sys.stderr,
        )

    def print(self, line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
