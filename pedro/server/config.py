"""ServerConfig: every knob of ``pedro serve``, from a YAML file and/or CLI flags (flags win).

One validated object is built at start-up so a typo in the YAML file stops the server with the field named,
instead of surfacing as a strange limit at request time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RayConfig(BaseModel):
    """Scale-out on Ray Serve (``pedro serve --ray``): engine replicas and how adapters are multiplexed."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(2, ge=1, description="Engine replicas (the initial count when autoscaling).")
    min_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling lower bound (set both bounds to enable).")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target per replica.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per engine replica.")
    num_gpus: Optional[float] = Field(
        None, ge=0, description="GPUs reserved per engine replica (default: 1 when the device is CUDA, else 0)."
    )
    max_adapters_per_replica: int = Field(16, ge=1, description="Multiplexed adapters a replica keeps registered.")
    address: Optional[str] = Field(None, description="Ray cluster address; None starts (or joins) a local one.")

    @model_validator(mode="after")
    def _bounds(self) -> "RayConfig":
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both ray.min_replicas and ray.max_replicas (autoscaling) or neither")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and not self.min_replicas <= self.replicas <= self.max_replicas
        ):
            raise ValueError("ray.replicas must lie within [ray.min_replicas, ray.max_replicas]")
        return self


class ServerConfig(BaseModel):
    """What ``pedro serve`` runs: the backbone, where adapters and keys live, network, and limits."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("smollm2-135m", description="Backbone name, model directory, or .gguf file.")
    model_name: Optional[str] = Field(None, description="The base model's id in the API (default: the backbone).")
    adapters_dir: Path = Field(Path("pedro-adapters"), description="Where registered adapters and the registry live.")
    keys_file: Optional[Path] = Field(None, description="YAML file mapping tenants to API keys (see docs/server.md).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # engine budgets
    max_batch: int = Field(16, ge=1, description="Running requests (engine rows) at once.")
    max_seq_len: int = Field(1024, ge=2, description="KV cache length per row (prompt + new tokens).")
    max_prefill_tokens: int = Field(
        32, ge=1, description="Prompt tokens' worth of prefill per engine step; a longer prompt is split over steps."
    )
    adapter_capacity: int = Field(32, ge=1, description="Adapters resident in memory at once (LRU).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Backbone dtype: float32 (exact), bfloat16 (~2x faster decoding on CPUs with native bf16), "
        "auto (decided for the device).",
    )
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="Where the engine runs: cpu, cuda or cuda:N."
    )
    exact_gemms: bool = Field(
        True,
        description="Every product bit for bit F.linear's (default); false: fp32 GEMMs through oneDNN on a CPU, "
        "batch-invariant, within rounding, faster where MKL is slow (Engine(exact_gemms=...)).",
    )
    # request limits
    max_prompt_tokens: int = Field(768, ge=1, description="Longer prompts get 400.")
    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_queued: int = Field(64, ge=0, description="Requests waiting beyond max_batch; more get 429.")
    max_requests_per_tenant: Optional[int] = Field(
        None,
        ge=1,
        description="Running + waiting requests per tenant; more get 429 for that tenant alone "
        "(default: half of max_batch + max_queued, so one tenant can never take all the room).",
    )
    max_upload_bytes: int = Field(64 * 2**20, ge=1, description="Largest adapter upload (413 above).")
    max_request_bytes: int = Field(
        2**20, ge=1, description="Largest request body other than an adapter upload (413 above, before it is parsed)."
    )
    max_adapters_per_tenant: int = Field(256, ge=1, description="Registered adapters per tenant (403 above).")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _limits(self) -> "ServerConfig":
        if self.max_requests_per_tenant is None:
            self.max_requests_per_tenant = max(1, (self.max_batch + self.max_queued) // 2)
        if self.max_prompt_tokens + 1 > self.max_seq_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be < max_seq_len ({self.max_seq_len})")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        on_cuda = self.device.startswith("cuda")
        if self.ray.num_gpus is None:
            self.ray.num_gpus = 1.0 if on_cuda else 0.0
        elif self.ray.num_gpus > 0 and not on_cuda:
            raise ValueError(
                f"ray.num_gpus is {self.ray.num_gpus} but the engine runs on {self.device}: "
                "set device: cuda, or reserve no GPU a replica would not use"
            )
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.backbone).name

    @classmethod
    def load(cls, path: Optional[Path] = None, **overrides: Any) -> "ServerConfig":
        """The YAML file's values (if any) with the non-None ``overrides`` on top; ``ray_*`` overrides go
        into the ``ray`` section. Raises ValueError naming the bad field."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ValueError(f"cannot read the server config {path}: {err}") from err
            if not isinstance(data, dict):
                raise ValueError(f"the server config {path} must be a YAML mapping")
        ray = dict(data.pop("ray", None) or {})
        for key, value in overrides.items():
            if value is None:
                continue
            if key.startswith("ray_"):
                ray[key[4:]] = value
            else:
                data[key] = value
        try:
            return cls.model_validate({**data, "ray": ray})
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"invalid server config: {problems}") from None
