"""Prometheus metrics of one server: queue length, running requests, tokens/s, per-adapter request counts, and
every HTTP response by status code (CountResponses, an ASGI middleware, so 5xx and refusals made before routing
are counted too).

Each app gets its own CollectorRegistry (not prometheus_client's global one) so several servers can live in
one process (tests, the Ray replicas) without "duplicated timeseries" errors. Gauges that mirror engine state
are read when Prometheus scrapes, not pushed on every step, so the engine loop pays nothing for them. On Ray
Serve they are the sums over the engine replicas, and ``pedro_replica_*{replica="..."}`` gives each replica's.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKENS_PER_SECOND_WINDOW_S = 10.0
# name, help, key of the backend's stats(): on Ray Serve the sum over the engine replicas
ENGINE_GAUGES = (
    ("pedro_queue_length", "Requests waiting for an engine slot.", "waiting"),
    ("pedro_running_requests", "Requests in the running batch.", "running"),
    ("pedro_requests_in_flight", "Requests admitted by the server and not finished.", "in_flight"),
    ("pedro_engine_restarts", "Times the engine failed inside a step and was rebuilt in-process.", "engine_restarts"),
)


class PerReplica:
    """Collector: each Ray Serve engine replica's gauges as ``pedro_replica_<gauge>{replica="<id>"}`` (from the
    backend's ``per_replica`` stats; nothing for a single-process server)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        per_replica = self.stats().get("per_replica") or {}
        if not per_replica:
            return
        for name, doc, key in ENGINE_GAUGES:
            family = GaugeMetricFamily(
                name.replace("pedro_", "pedro_replica_", 1), f"{doc} Per engine replica.", labels=["replica"]
            )
            for replica, gauges in per_replica.items():
                family.add_metric([replica], gauges.get(key, 0))
            yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pedro_requests",
            "Finished API requests by tenant, model (adapter) and outcome.",
            ["tenant", "model", "endpoint", "outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "pedro_rejections",
            "Requests refused before generation, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.responses = Counter(
            "pedro_http_responses",
            "HTTP responses by status code and route template (never the raw path).",
            ["status", "route"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("pedro_prompt_tokens", "Prompt tokens of served requests.", registry=self.registry)
        self.generated_tokens = Counter("pedro_generated_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram(
            "pedro_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self._window: deque[tuple[float, int]] = deque()
        for name, doc, key in ENGINE_GAUGES:

            def value(key: str = key) -> float:
                return stats().get(key, 0)

            Gauge(name, doc, registry=self.registry).set_function(value)
        self.registry.register(PerReplica(stats))
        Gauge(
            "pedro_tokens_per_second",
            f"Generated tokens/s over the last {TOKENS_PER_SECOND_WINDOW_S:.0f} s.",
            registry=self.registry,
        ).set_function(self.tokens_per_second)

    def add_tokens(self, n: int) -> None:
        self.generated_tokens.inc(n)
        self._window.append((time.monotonic(), n))

    def tokens_per_second(self) -> float:
        horizon = time.monotonic() - TOKENS_PER_SECOND_WINDOW_S
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
        return sum(n for _, n in self._window) / TOKENS_PER_SECOND_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)


UNMATCHED = "unmatched"


def route_template(scope: Scope, routes: Iterable) -> str:
    """The route's path template (``/v1/adapters/{name}``) for a request, never its raw path (raw paths carry
    adapter names): the route the router picked, else the one that would match (a request refused before
    routing), else ``unmatched``."""
    route = scope.get("route")
    if route is None:
        for candidate in routes:
            try:
                match, _ = candidate.matches(scope)
            except Exception:  # a route that cannot judge this scope does not match it
                continue
            if match != Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class CountResponses:
    """ASGI middleware: counts every HTTP response in ``counter`` by status and route template. An exception
    that escapes the app before a response started is counted as the 500 the server then sends."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: Callable[[], Iterable]) -> None:
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not status:
                status.append(500)
            raise
        finally:
            if status:
                self.counter.labels(str(status[0]), route_template(scope, self.routes())).inc()
