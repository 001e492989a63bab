"""One run: the workloads against a server (warm-up, closed-loop steps, open-loop steps, then the baselines), or
the engine alone; every result goes into the report as soon as it is measured."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import httpx

from embedpool.benchmark.baselines import Baselines
from embedpool.benchmark.grpc_target import GrpcTarget
from embedpool.benchmark.http_target import HttpTarget
from embedpool.benchmark.local_model import TokenCounter, find_model, try_counter
from embedpool.benchmark.loops import closed_loop, open_loop
from embedpool.benchmark.options import DEFAULT_DOCS, Options
from embedpool.benchmark.progress import Progress
from embedpool.benchmark.report import Report
from embedpool.benchmark.scrape import CACHE_HITS, Scraper, Snapshot, server_figures
from embedpool.benchmark.stats import Sample, summarize
from embedpool.benchmark.table import HEADER, step_row
from embedpool.benchmark.target import ServerInfo, Target, host_of
from embedpool.benchmark.workload import Request, Workload, corpus_workload, jsonl_workload, token_workloads
from embedpool.engine import pick_device, serving_variant

__all__ = ["Runner"]

# A /metrics that does not answer within this long is dropped for the rest of the run.
_SCRAPE_TIMEOUT_S = 5.0
_DEFAULT_METRICS_PORT = 9464


class Runner:
    def __init__(self, options: Options, report: Report, stop: threading.Event) -> None:
        self.options = options
        self.report = report
        self.stop = stop
        self.progress = Progress(enabled=options.progress)
        self.scraper: Scraper | None = None
        self.baselines = Baselines(options, report, self.progress, stop)

    async def run(self) -> None:
        if self.options.mode == "engine":
            await self._engine_only()
        else:
            await self._server()

    # A server.

    def _target(self) -> Target:
        o = self.options
        # Open loop sends whatever is due: room for many requests in flight, beyond the closed loop's callers.
        in_flight = max([*o.concurrency, 256 if o.rates else 1])
        if o.mode == "http":
            return HttpTarget(o.target, o.credentials, in_flight=in_flight, timeout=o.timeout, encoding=o.http_encoding)
        return GrpcTarget(o.target, o.credentials, in_flight=in_flight, timeout=o.timeout, retries=o.retries)

    async def _server(self) -> None:
        target = self._target()
        try:
            info = await target.info()
            self.report.data["target"].update(addresses=target.addresses, server=info.as_dict())
            docs = self.options.docs or DEFAULT_DOCS.get(info.device, DEFAULT_DOCS["cpu"])
            self.report.data["settings"]["docs_per_step"] = docs
            counter = self._server_counter(info)
            self.scraper = await self._scraper(target.addresses)
            workloads = self._workloads(docs, counter)
            self.progress.print(HEADER)
            for workload in workloads:
                self.report.add("workloads", workload.describe())
                for k, per_request in enumerate(self.options.per_request):
                    await self._sweep(target, workload, per_request, warm=k == 0)
            for workload in workloads:
                await self.baselines.against_server(workload, info, counter, target.addresses)
        finally:
            with anyio.CancelScope(shield=True):
                await target.aclose()
                if self.scraper is not None:
                    await self.scraper.aclose()

    async def _sweep(self, target: Target, workload: Workload, per_request: int, *, warm: bool) -> None:
        """The concurrency levels and rates at one request size."""
        requests = workload.requests(per_request)
        if warm and self.options.warmup > 0:
            # The sweep's first level: more callers would leave requests in flight long after the warm-up.
            first = min(self.options.concurrency or [1])
            await self._step(target, workload, requests, per_request, "warmup", concurrency=first)
        for concurrency in self.options.concurrency:
            if concurrency > len(requests):
                self.report.note(
                    f"{workload.name} c={concurrency} x{per_request}: a step has only {len(requests)} requests, so"
                    " fewer are in flight at once; raise --docs"
                )
            await self._step(target, workload, requests, per_request, "closed", concurrency=concurrency)
        for rate in self.options.rates:
            await self._step(target, workload, requests, per_request, "open", rate=rate)

    def _server_counter(self, info: ServerInfo) -> TokenCounter | None:
        counter, why = try_counter(self.options.model)
        if counter is None:
            self.report.note(f"token counts unknown: {why}")
            return None
        local = counter.bundle.config.name
        if local != info.model:
            if not self.options.model:
                self.report.note(
                    f"token counts unknown: the local model {local} is not the server's {info.model}"
                    " (pass --model DIR of the server's model)"
                )
                return None
            self.report.note(f"tokenizing with {local} (--model); the server serves {info.model}")
        return counter

    async def _scraper(self, addresses: list[str]) -> Scraper | None:
        urls = self.options.metrics
        if urls is None:  # derive: the default /metrics port of a single server
            if len(addresses) != 1:
                self.report.note("no server metrics: give --metrics URL,URL (one per replica)")
                return None
            scheme = "https" if self.options.credentials.tls_ca else "http"
            host = host_of(addresses[0])
            urls = [f"{scheme}://{'[' + host + ']' if ':' in host else host}:{_DEFAULT_METRICS_PORT}/metrics"]
        if not urls:
            return None
        scraper = Scraper(urls, self.options.credentials, timeout=_SCRAPE_TIMEOUT_S)
        try:
            await scraper.snapshot()
        except (httpx.HTTPError, ValueError) as exc:
            await scraper.aclose()
            self.report.note(
                f"no server metrics: {', '.join(urls)} did not answer ({type(exc).__name__}); pass --metrics URL"
            )
            return None
        self.report.data["metrics_urls"] = urls
        return scraper

    async def _snapshot(self) -> Snapshot | None:
        if self.scraper is None:
            return None
        with anyio.move_on_after(_SCRAPE_TIMEOUT_S, shield=True):
            try:
                return await self.scraper.snapshot()
            except (httpx.HTTPError, ValueError) as exc:
                self.report.note(f"a /metrics scrape failed ({type(exc).__name__}): that step has no server figures")
        return None

    async def _step(
        self,
        target: Target,
        workload: Workload,
        requests: list[Request],
        per_request: int,
        mode: str,
        *,
        concurrency: int | None = None,
        rate: float | None = None,
    ) -> None:
        o = self.options
        samples: list[Sample] = []
        step: dict[str, Any] = {
            "workload": workload.name,
            "mode": mode,
            "target": target.kind,
            "concurrency": concurrency,
            "rate": rate,
            "arrivals": o.arrivals if mode == "open" else None,
            "docs_per_request": per_request,
        }
        label = f"{workload.name} {'rate ' + format(rate, 'g') if rate else mode + ' c=' + str(concurrency)}"
        total = None if mode == "warmup" else len(requests) * per_request
        with self.progress.bar(label, total, "doc") as bar:

            def record(sample: Sample) -> None:
                samples.append(sample)
                bar.update(per_request)

            before = await self._snapshot()
            started = anyio.current_time()
            limit = o.warmup if mode == "warmup" else o.duration
            until = started + limit if limit else None
            partial = True
            try:
                if mode == "open":
                    assert rate is not None
                    await open_loop(target, requests, rate, o.arrivals, record, until=until)
                else:
                    assert concurrency is not None
                    await closed_loop(target, requests, concurrency, record, until=until, repeat=mode == "warmup")
                partial = False
            finally:
                ended = anyio.current_time()
                after = await self._snapshot()
                step.update(summarize(samples, started, ended))
                step["partial"] = partial
                step["server"] = self._server_figures(before, after, ended - started, step["docs"])
                self.report.add("warmup" if mode == "warmup" else "steps", step)
                self.progress.print(step_row(step))

    def _server_figures(
        self, before: Snapshot | None, after: Snapshot | None, elapsed: float, docs: int
    ) -> dict[str, Any] | None:
        if before is None or after is None:
            return None
        figures = server_figures(before, after, elapsed)
        cached = after[CACHE_HITS] - before[CACHE_HITS]  # texts answered without embedding them
        if figures["documents"] + cached < docs:  # fewer than we sent: not this server's counters
            self.report.note("server metrics dropped: the /metrics given counted fewer documents than were embedded")
            return None
        if cached:
            self.report.note(
                "the server's query cache answered repeated texts without embedding them: start it with"
                " --query-cache-bytes 0 to measure inference"
            )
        return figures

    # The engine alone.

    async def _engine_only(self) -> None:
        o = self.options
        bundle = find_model(o.model)
        counter = TokenCounter(bundle)
        device = pick_device(o.device)
        variant = serving_variant(o.variant, device, bundle)
        docs = o.docs or DEFAULT_DOCS[device]
        self.report.data["settings"]["docs_per_step"] = docs
        self.report.data["target"]["server"] = {"model": bundle.config.name, "variant": variant, "device": device}
        workloads = self._workloads(docs, counter)
        self.progress.print(HEADER)
        for workload in workloads:
            self.report.add("workloads", workload.describe())
            await self.baselines.engine(workload, counter, variant, device)
            if o.baselines is None or "st" in o.baselines:
                await self.baselines.sentence_transformers(workload, device)

    # Shared.

    def _workloads(self, docs: int, counter: TokenCounter | None) -> list[Workload]:
        o = self.options
        if o.tokens:
            return token_workloads(o.tokens, docs, counter)
        if o.jsonl is not None:
            return [jsonl_workload(o.jsonl, docs, counter)]
        return [corpus_workload(docs, counter)]
