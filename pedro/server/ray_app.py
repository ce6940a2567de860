"""The same API as a Ray Serve application: one light ingress, N engine replicas, adapters multiplexed.

::

    HTTP -> Ray Serve proxy -> PedroIngress (the FastAPI app of app.py: keys, registry, limits, SSE)
                                  |  handle.options(multiplexed_model_id="<tenant>:<name>@<version>")
                                  v
                               PedroEngine x N (a LocalBackend each: one Engine, one backbone copy)

Each replica runs at most ``max_batch`` requests (Ray Serve's ``max_ongoing_requests``); beyond that requests
wait in the ingress's router for a free replica, at most ``max_queued`` of them (``max_queued_requests`` on the
engine deployment), and the next one is refused with the same 429 + Retry-After as the single-process server.

Ray Serve's model multiplexing routes each request to a replica that already holds its adapter (the adapter's
engine name is the multiplexed model id), so a tenant's traffic sticks to few replicas and each replica's
engine keeps its resident adapters hot. Replicas read adapters from the same ``adapters_dir`` the ingress
writes: on several nodes that directory must be shared storage (NFS, a mounted bucket). Requests for the bare
backbone carry no model id and go to any replica. Ray Serve does the routing, autoscaling, health checks and
replica restarts; we do not write our own distributed engine.

Engine gauges: a handle cannot address one replica, so each engine replica pushes its gauges (running, waiting,
in_flight, engine_restarts) to the ingress when they change and at least every ``STATS_HEARTBEAT_S``; /health and
/metrics show their sums and each replica's values. A replica not heard from for ``STATS_STALE_S`` (stopped,
replaced) is left out.

Entry points: ``pedro serve --ray`` (serve_on_ray), and ``app_builder`` for ``serve run`` / ``serve deploy``
with serve.yaml.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Iterator, Optional

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pedro.engine import RequestOutput, SamplingParams
from pedro.server.adapter_registry import AdapterRegistry
from pedro.server.app import create_app
from pedro.server.auth import KeyRing, check_name
from pedro.server.backend import LocalBackend, Prompt
from pedro.server.config import ServerConfig
from pedro.server.errors import APIError

log = logging.getLogger("pedro.server")
ENGINE_GAUGES = ("running", "waiting", "in_flight", "engine_restarts")  # LocalBackend.stats() keys
STATS_POLL_S = 0.25  # how often a replica looks at its gauges; it reports a change at once ...
STATS_HEARTBEAT_S = 2.0  # ... and an unchanged value this often
STATS_STALE_S = 10.0  # a replica silent this long is no longer counted (Ray's default health-check period)
# Ray Serve's controller kills an HTTP proxy that has not answered its ready check within 5 s of starting, and
# serve.start then fails with ActorDiedError: on a loaded machine a proxy's imports alone take longer. The
# controller gets this much instead, unless the environment sets the variable itself.
PROXY_READY_TIMEOUT = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "180")


def _adapter_dir(config: ServerConfig, engine_name: str) -> Path:
    """``<tenant>:<name>@<version>`` -> its directory in the shared store (names re-checked: ids arrive over the wire)."""
    qualified, _, _version = engine_name.rpartition("@")
    tenant, _, name = qualified.partition(":")
    return AdapterRegistry(config.adapters_dir).path(check_name("tenant", tenant), check_name("adapter", name))


@contextlib.contextmanager
def _queue_full_is_429() -> Iterator[None]:
    """Ray Serve's back-pressure (every engine replica busy and ``max_queued_requests`` already waiting in this
    caller's router) -> the single-process server's queue-full 429. It is raised when the call is assigned to a
    replica, i.e. before the first output, so app.py still answers with an HTTP status, not an SSE error."""
    try:
        yield
    except BackPressureError:
        raise APIError(
            429,
            "the server is at capacity (every engine replica is busy and the queue is full); retry shortly",
            code="queue_full",
            retry_after=1,
        ) from None


class RayBackend:
    """The ingress side of the Backend protocol: every call goes to a PedroEngine replica through its handle."""

    def __init__(self, engine: DeploymentHandle, replicas: int) -> None:
        self.engine = engine
        self.replicas = replicas
        self.routing: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.replica_stats: dict[str, tuple[float, dict[str, float]]] = {}  # replica -> (when reported, gauges)

    def record_replica(self, replica: str, stats: dict[str, float]) -> None:
        """An engine replica's report of its gauges (PedroEngine pushes them: see the module docstring)."""
        self.replica_stats[replica] = (time.monotonic(), {key: stats.get(key, 0) for key in ENGINE_GAUGES})

    async def stream(
        self,
        prompt: Prompt,
        adapter: Optional[str],
        sampling: SamplingParams,
        tenant: Optional[str] = None,
        raw_prompt: Optional[bool] = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter or "")
        responses = handle.stream.remote(prompt, sampling, tenant, raw_prompt)
        finished = False
        with _queue_full_is_429():  # outside the finally: a refused call's cancel() raises the refusal again
            try:
                async for replica, out in responses:  # type: ignore[union-attr]  # a stream=True handle's response
                    if out.token_ids == out.delta_token_ids:  # the first output: count where it was routed
                        self.routing[adapter or "<base>"][replica] += 1
                    finished = out.finished
                    yield out
            finally:
                if not finished:
                    responses.cancel()  # the replica's generator is cancelled: its engine request is aborted

    async def stream_all(
        self, wanted: list[tuple[Prompt, SamplingParams, Optional[bool]]], adapter: Optional[str], tenant: Optional[str]
    ) -> list[AsyncGenerator[RequestOutput, None]]:
        """One ``stream`` each: the replica router places every request on its own, so the n samples of a prompt
        may land on different replicas and are prefilled there."""
        return [self.stream(prompt, adapter, sampling, tenant, raw_prompt) for prompt, sampling, raw_prompt in wanted]

    def stats(self) -> dict[str, Any]:
        """The engine gauges summed over the replicas that reported in the last STATS_STALE_S, each replica's own
        values (``per_replica``), and the routing counts (adapter -> replica -> requests) seen by this ingress."""
        horizon = time.monotonic() - STATS_STALE_S
        for replica, (seen, _) in list(self.replica_stats.items()):
            if seen < horizon:
                self.replica_stats.pop(replica, None)
        per_replica = {replica: gauges for replica, (_, gauges) in sorted(self.replica_stats.items())}
        totals = {key: sum(gauges[key] for gauges in per_replica.values()) for key in ENGINE_GAUGES}
        routing = {model: dict(c) for model, c in self.routing.items()}
        return {"replicas": self.replicas, **totals, "per_replica": per_replica, "routing": routing}

    async def ready(self) -> bool:
        """True once Ray Serve reports every deployment of this application HEALTHY (all target replicas up):
        the ingress answers HTTP earlier than the engine replicas finish loading the backbone."""
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(app_name)
        return app is not None and all(d.status == "HEALTHY" for d in app.deployments.values())

    async def check(self, directory: Path) -> dict[str, Any]:
        with _queue_full_is_429():
            return await self.engine.check.remote(str(directory))

    async def add_adapter(self, engine_name: str, directory: Path) -> None:
        """Nothing to do up front: a replica loads an adapter from the shared store when routed its first request."""

    async def remove_adapter(self, engine_name: str) -> None:
        """Nothing to do: the ingress no longer resolves the name, so no request can reach a replica's copy;
        replicas keep only its registration metadata (weights are loaded on demand and LRU-evicted)."""


def build(config: ServerConfig) -> serve.Application:
    """The Ray Serve application for ``config`` (deployment classes are made here so the config's multiplexing
    bound, resources and request limits apply)."""
    ray_cfg = config.ray
    scaling: dict[str, Any] = {"num_replicas": ray_cfg.replicas}
    if ray_cfg.min_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": ray_cfg.min_replicas,
                "initial_replicas": ray_cfg.replicas,
                "max_replicas": ray_cfg.max_replicas,
                "target_ongoing_requests": ray_cfg.target_ongoing_requests,
            }
        }

    @serve.deployment(
        name="PedroEngine",
        ray_actor_options={"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus},
        max_ongoing_requests=config.max_batch,  # a replica runs a full batch; the rest wait in the router ...
        max_queued_requests=max(1, config.max_queued),  # ... up to max_queued, then 429 (Ray needs at least 1)
        **scaling,
    )
    class PedroEngine:
        def __init__(self, config_json: str) -> None:
            import torch

            torch.set_num_threads(max(1, int(ray_cfg.num_cpus)))
            self.config = ServerConfig.model_validate_json(config_json)
            self.backend = LocalBackend.from_config(self.config)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.known: set[str] = set()
            self.reporter: Optional[asyncio.Task] = None
            self.report_stats()

        def report_stats(self) -> None:
            """Start pushing this replica's gauges to the ingress (again, if the task ended); needs the replica's
            event loop, which Ray Serve runs the constructor and check_health on."""
            if self.reporter is None or self.reporter.done():
                with contextlib.suppress(RuntimeError):  # no running loop: check_health starts it
                    self.reporter = asyncio.get_running_loop().create_task(self._report_stats())

        async def _report_stats(self) -> None:
            ingress = serve.get_deployment_handle("PedroIngress", app_name=serve.get_replica_context().app_name)
            last, sent = None, 0.0
            while True:
                current = self.backend.stats()
                stats = {key: current[key] for key in ENGINE_GAUGES}
                if stats != last or time.monotonic() - sent >= STATS_HEARTBEAT_S:
                    try:
                        await asyncio.wait_for(self._push(ingress, stats), timeout=STATS_STALE_S)
                        last, sent = stats, time.monotonic()
                    except asyncio.CancelledError:
                        raise
                    except Exception as err:  # the ingress is (re)starting: try again at the next poll
                        log.debug("could not report engine stats to the ingress: %s", err)
                await asyncio.sleep(STATS_POLL_S)

        async def _push(self, ingress: DeploymentHandle, stats: dict[str, float]) -> None:
            await ingress.record_replica_stats.remote(self.replica, stats)

        @serve.multiplexed(max_num_models_per_replica=ray_cfg.max_adapters_per_replica)
        async def adapter(self, engine_name: str) -> str:
            if engine_name not in self.known:
                await self.backend.add_adapter(engine_name, _adapter_dir(self.config, engine_name))
                self.known.add(engine_name)
            return engine_name

        async def stream(
            self,
            prompt: Prompt,
            sampling: SamplingParams,
            tenant: Optional[str] = None,
            raw_prompt: Optional[bool] = None,
        ) -> AsyncIterator[tuple[str, RequestOutput]]:
            adapter = serve.get_multiplexed_model_id() or None
            if adapter is not None:
                await self.adapter(adapter)
            async for out in self.backend.stream(prompt, adapter, sampling, tenant=tenant, raw_prompt=raw_prompt):
                yield self.replica, out

        async def check_health(self) -> None:
            """Ray Serve calls this periodically: a replica whose engine thread stopped is replaced."""
            if not await self.backend.ready():
                raise RuntimeError("the engine thread has stopped")
            self.report_stats()

        async def check(self, directory: str) -> dict[str, Any]:
            return await self.backend.check(Path(directory))

        async def stats(self) -> dict[str, Any]:
            """This replica's id and engine gauges (running, waiting, in_flight), for operators and the tests:
            ``serve.get_deployment_handle("PedroEngine", "pedro").stats.remote()``."""
            return {"replica": self.replica, **self.backend.stats()}

    # The ingress must never be the limit (Ray's default is 5 requests at once): beyond its max_ongoing_requests
    # Ray's proxy holds requests in a queue of its own, in front of our 429. Room for everything the engines can
    # hold (running + queued, at the most replicas) and as many again answered at once (429s, health, uploads).
    capacity = (ray_cfg.max_replicas or ray_cfg.replicas) * config.max_batch + config.max_queued

    @serve.deployment(
        name="PedroIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, 2 * capacity),
    )
    @serve.ingress()
    class PedroIngress:
        def __init__(self, config_json: str, engine: DeploymentHandle) -> None:
            self.config = ServerConfig.model_validate_json(config_json)
            self.backend = RayBackend(engine, ray_cfg.replicas)
            self.keys = KeyRing.load(self.config.keys_file)

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.config, self.backend, self.keys)

        async def record_replica_stats(self, replica: str, stats: dict[str, float]) -> None:
            """Called by every PedroEngine replica through a handle (not an HTTP route): its engine gauges."""
            self.backend.record_replica(replica, stats)

    config_json = config.model_dump_json()
    return PedroIngress.bind(config_json, PedroEngine.bind(config_json))  # type: ignore[attr-defined]  # added by @serve.deployment


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For serve.yaml (``import_path: pedro.server.ray_app:app_builder``): ``args`` holds ``config`` (a
    pedro server YAML file) and/or any ServerConfig field."""
    args = dict(args)
    path = args.pop("config", None)
    ray = args.pop("ray", None) or {}
    return build(ServerConfig.load(Path(path) if path else None, **args, **{f"ray_{k}": v for k, v in ray.items()}))


def serve_on_ray(config: ServerConfig) -> None:
    """``pedro serve --ray``: connect to (or start) a Ray cluster, deploy, and block until SIGINT / SIGTERM,
    then tear the application down (and the local cluster, when this process started it)."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    KeyRing.load(config.keys_file)  # fail fast on a bad keys file, before any replica starts
    ray.init(address=config.ray.address, include_dashboard=False, logging_level=logging.WARNING)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        name, default = PROXY_READY_TIMEOUT
        try:
            serve.start(
                http_options={"host": config.host, "port": config.port},
                controller_options={"runtime_env": {"env_vars": {name: os.environ.get(name, default)}}},
            )
        except TimeoutError:  # serve.start waits 60 s for the proxy; the controller waits PROXY_READY_TIMEOUT
            log.warning("Ray Serve's HTTP proxy is still starting after 60 s; it serves once it is ready")
        serve.run(build(config), name="pedro", route_prefix="/", blocking=False)
        log.info(
            "pedro on Ray Serve: http://%s:%d (%d engine replica(s))", config.host, config.port, config.ray.replicas
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
