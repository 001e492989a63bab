"""`embedpool bench`: runs the benchmark the flags describe (or compares two runs), prints the table, writes the
JSON and the plot. Ctrl-C (or SIGTERM) stops it after the requests in flight, keeping what was measured."""

from __future__ import annotations

import argparse
import signal
import threading

import anyio

from embedpool.benchmark.compare import compare
from embedpool.benchmark.options import Options
from embedpool.benchmark.plot import plot
from embedpool.benchmark.progress import Progress
from embedpool.benchmark.report import Report
from embedpool.benchmark.runner import Runner
from embedpool.benchmark.table import ratio_lines

__all__ = ["EXIT_INTERRUPTED", "run"]

EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


async def _measure(options: Options, report: Report) -> bool:
    """The run; True when a signal cut it short."""
    stop = threading.Event()  # read by the baselines' worker threads between batches
    work = anyio.CancelScope()
    interrupted = False

    async def on_signal() -> None:
        nonlocal interrupted
        # Only the first: once this receiver is closed, a second Ctrl-C ends the process the usual way.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted = True
                stop.set()
                work.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signal)
        with work:
            await Runner(options, report, stop).run()
        tg.cancel_scope.cancel()
    return interrupted


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def run(args: argparse.Namespace) -> int:
    if args.compare:
        print("\n".join(compare(*args.compare)))
        return 0
    options = Options.from_args(args)
    report = Report(options.out, mode=options.mode, settings=options.settings())
    out = Progress(enabled=False)
    try:
        interrupted = anyio.run(_measure, options, report, backend="asyncio")
    except BaseExceptionGroup as group:  # what the run raised, wrapped by the task group
        error = _sole(group)
        report.data["error"] = f"{type(error).__name__}: {error}"
        report.finish(interrupted=False, complete=False)
        raise error from None
    report.finish(interrupted=interrupted)
    for line in ratio_lines(report.data["ratios"]):
        out.print(line)
    if options.out is not None:
        skipped = plot(report.data, options.out / "bench.png")
        if skipped:
            report.note(skipped)
        written = [str(report.path)] + ([] if skipped else [str(options.out / "bench.png")])
        out.print("wrote " + " and ".join(written))
    for note in report.data["notes"]:
        out.print(f"note: {note}")
    if interrupted:
        out.print("interrupted: the JSON holds the steps measured until then")
    return EXIT_INTERRUPTED if interrupted else 0
