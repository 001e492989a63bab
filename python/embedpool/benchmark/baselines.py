"""The baselines of a run, each swept over batch sizes in a worker thread beside the event loop: raw ONNX Runtime on
the model file, and sentence-transformers. Each size's row is printed and kept as it is measured."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, cast

import anyio
import anyio.to_thread

from embedpool.benchmark.credentials import is_loopback
from embedpool.benchmark.engine_baseline import engine_sweep
from embedpool.benchmark.local_model import TokenCounter, checkpoint_path
from embedpool.benchmark.options import Options
from embedpool.benchmark.progress import Progress
from embedpool.benchmark.report import Report
from embedpool.benchmark.st_baseline import st_sweep
from embedpool.benchmark.sweep import SweepPoint, default_batch_sizes, sweep_report, useful_batch_sizes
from embedpool.benchmark.table import baseline_row
from embedpool.benchmark.target import ServerInfo, host_of
from embedpool.benchmark.workload import Workload
from embedpool.errors import EmbedpoolError
from embedpool.model.session import Device, VariantChoice

__all__ = ["Baselines"]


class Baselines:
    def __init__(self, options: Options, report: Report, progress: Progress, stop: threading.Event) -> None:
        self.options = options
        self.report = report
        self.progress = progress
        self.stop = stop

    async def against_server(
        self, workload: Workload, info: ServerInfo, counter: TokenCounter | None, addresses: list[str]
    ) -> None:
        """The engine baseline on the server's own graph when the server runs on this machine (or when asked for),
        and sentence-transformers when importable; `--baseline` picks."""
        wanted = self.options.baselines
        if wanted is None or "engine" in wanted:
            why = ""
            if counter is None:
                why = "no local copy of the server's model (pass --model DIR)"
            elif wanted is None and not all(is_loopback(host_of(a)) for a in addresses):
                why = "the server is on another machine (--baseline engine runs it here anyway)"
            if why:
                self.report.baseline(workload.name, "engine", {"skipped": why})
            else:
                assert counter is not None
                device: Device = "cuda" if info.device == "cuda" else "cpu"
                variant = cast(VariantChoice, info.variant)  # the server's very graph
                await self.engine(workload, counter, variant, device)
        if wanted is None or "st" in wanted:
            await self.sentence_transformers(workload, info.device)

    def _batch_sizes(self, device: str) -> list[int]:
        return self.options.batch_sizes or list(default_batch_sizes(device))

    async def engine(self, workload: Workload, counter: TokenCounter, variant: VariantChoice, device: Device) -> None:
        sizes = self._batch_sizes(device)
        sweep = functools.partial(
            engine_sweep,
            counter.bundle,
            workload.texts,
            sizes,
            variant=variant,
            device=device,
            threads=self.options.threads,
            stop=self.stop,
        )
        await self._sweep(workload.name, "engine", sweep, len(useful_batch_sizes(sizes, len(workload.texts))))

    async def sentence_transformers(self, workload: Workload, device: str) -> None:
        sizes = self._batch_sizes(device)
        sweep = functools.partial(
            st_sweep,
            checkpoint_path(self.options.model),
            workload.texts,
            sizes,
            device=device,
            tokens=sum(workload.tokens or []),
            site=self.options.baseline_site,
            stop=self.stop,
        )
        await self._sweep(
            workload.name, "sentence_transformers", sweep, len(useful_batch_sizes(sizes, len(workload.texts)))
        )

    async def _sweep(self, workload: str, name: str, sweep: Callable[..., dict[str, Any]], sizes: int) -> None:
        """Runs a baseline's sweep in a worker thread (`self.stop` ends it early), one row per batch size."""
        short = "engine" if name == "engine" else "st"
        points: list[SweepPoint] = []
        result: dict[str, Any] | None = None
        with self.progress.bar(f"{workload} {name}", sizes, "batch size") as bar:

            def on_point(point: SweepPoint) -> None:
                points.append(point)
                bar.update()
                self.progress.print(baseline_row(workload, short, point.as_dict(), best=False))

            try:
                result = await anyio.to_thread.run_sync(functools.partial(sweep, on_point=on_point))
            except EmbedpoolError as exc:  # e.g. the local model lacks the server's variant
                result = {"skipped": str(exc)}
            finally:
                if result is None:  # interrupted: keep the sizes measured
                    result = sweep_report(points, interrupted=True)
                self._baseline_done(workload, name, result)

    def _baseline_done(self, workload: str, name: str, result: dict[str, Any]) -> None:
        self.report.baseline(workload, name, result)
        if "skipped" in result:
            self.report.note(f"{name} baseline skipped: {result['skipped']}")
        elif result["best"] is not None:
            short = "engine" if name == "engine" else "st"
            self.progress.print(baseline_row(workload, short, result["best"], best=True))
