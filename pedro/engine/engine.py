"""Engine: one frozen backbone serving many adapters (PEDRO, LoRA, (IA)3, or none) in one running batch.

Synchronous core, driven by ``step()``: each step decodes one token for every running row, prefills the
newly admitted requests (their first token), then retires finished rows. ``generate()`` drives it for an
offline list of requests; async_engine.py drives it from a background thread for streaming callers.

Isolation: whatever goes wrong for one request fails that request alone. Its adapter's weights are read and
materialised on a background thread (a failure finishes only the requests waiting for that adapter, and a
slow disk never stalls the running batch); a row whose logits are not finite (an adapter that overflows) is
finished with an error and its cache slot cleared; a prefill that raises is retried request by request so
only the request that fails alone is failed. Anything else that raises inside a step is an engine bug: the
caller (AsyncEngine) fails every request the engine holds and calls ``reset()``.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, TypeGuard, Union

import torch
from torch import nn

from pedro.backbones import load_backbone, resolve_dtype
from pedro.compat import token_bytes
from pedro.data import encode_prompt
from pedro.engine.adapters import AdapterError, AdapterStore, ModelSpec, Registered
from pedro.engine.decode_graphs import DecodeGraphs
from pedro.engine.detokenizer import added_text, incomplete_tail, is_text
from pedro.engine.device import DeviceLike, canonical, upload
from pedro.engine.host_memory import keep_freed_memory
from pedro.engine.kv_cache import KVCache
from pedro.engine.request import (
    ADAPTER_LOAD_FAILED,
    ENGINE_FAILURE,
    NUMERIC_OVERFLOW,
    REQUEST_FAILED,
    PromptTooLong,
    QueueFull,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    TenantLimit,
    TokenLogprob,
)
from pedro.engine.rows import RowAdapters
from pedro.engine.runner import LayeredPrefill, ModelRunner, PrefillBatch, PromptScores, check_supported
from pedro.engine.sampling import sample, token_logprobs
from pedro.engine.scheduler import Piece, Scheduler, Sequence
from pedro.model import plan_sites

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A text prompt longer than this many characters per allowed token is refused before it is tokenised, so a
# multi-megabyte prompt costs nothing (tokenising 5 MB takes seconds). No tokenizer of a supported backbone
# averages anywhere near 32 characters per token on real text.
MAX_CHARS_PER_TOKEN = 32
STATS_WINDOW = 4096  # steps kept in Engine.stats
LOGPROB_CONTEXT = 6  # tokens of context a logprob's token text is decoded after
DECODE_GRAPHS = ("auto", "off", "padded")


def _own_copy(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` for the engine thread's decoding, or None when there is no tokenizer or it cannot
    be copied (decoding then shares it under the encoders' lock)."""
    if tokenizer is None:
        return None
    try:
        return copy.deepcopy(tokenizer)
    except Exception:
        return None


def _is_unicode(text: str) -> bool:
    """False for a string no tokenizer can take: JSON's \\ud800 escapes decode to lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_token_ids(prompt: Any) -> TypeGuard[list[int]]:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _is_messages(prompt: Any) -> TypeGuard[list[dict[str, str]]]:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


class Engine:
    """Multi-tenant inference on one backbone.

    ``backbone``: a name/path for :func:`pedro.load_backbone`, or a loaded transformers model (then pass its
    ``tokenizer``; without one, prompts must be token ids and stop strings are unavailable).
    ``max_batch`` running rows at most, each with ``max_seq_len`` tokens of KV cache; while rows decode, each step
    prefills at most ``max_prefill_tokens`` prompt tokens' worth of work (a token through every layer), a longer prompt
    being split over steps -- by position, or layer by layer for a PEDRO row (scheduler.py) -- so that decoding rows
    keep getting tokens while it is admitted; ``adapter_capacity`` adapters are resident
    at once (the rest stay on disk / CPU and are loaded on demand, least recently used evicted);
    ``max_waiting`` bounds the queue of requests waiting for a free row (beyond it add_request raises QueueFull);
    ``max_per_tenant`` bounds each tenant's running + waiting requests (QueueFull for that tenant alone).
    ``dtype`` (a torch dtype, its name, or "auto") is the dtype to load a named backbone in; bfloat16 runs
    decoding about 2x faster on CPUs with native bf16 (see docs/engine.md) but is not bit-identical to
    float32; "auto" is decided for ``device``. A loaded model runs in its own dtype: cast it yourself, the
    engine never changes it in place.
    ``device``: where the engine runs (a torch device or its name: "cpu", "cuda", "cuda:1"). A named backbone
    is loaded there; a loaded model runs where it is (default: its device; move it yourself). Every tensor the
    engine keeps or a step reads is on that device (device.py).
    ``decode_graphs``: "auto" (a CUDA device replays decode steps from CUDA graphs, one per batch and width
    bucket; elsewhere steps run as they come), "off", or "padded" (the graphs' padded steps, run eagerly: on a
    CPU, the check of what a graph replays) -- decode_graphs.py.
    ``fuse_projections``: run q/k/v and gate/up as one GEMM each (None: on an accelerator, where it is faster;
    on a CPU in bf16, and in fp32 with ``exact_gemms=False``, where oneDNN's wider products make a batch-32
    decode step 1.07x faster at 2 threads; not on fp32's exact path, where MKL's fused products run slower and,
    at prefill row counts, differ in the last bits from one GEMM per module) -- runner.py.
    ``exact_gemms``: every linear layer's product bit for bit ``F.linear``'s, as transformers and PEFT compute
    it (the default). False: in fp32 on a CPU, oneDNN's packed GEMMs instead of MKL's, faster where MKL is
    slow (1.39x a decode step on an AMD CPU with AVX2 only, docs/engine.md), batch-invariant (a request's tokens
    do not depend on its batch), within fp32 rounding of ``F.linear`` but not equal to it; where oneDNN fails
    those checks, as the default. bf16's products are exact either way.
    ``cpu_kernels``: in bf16 on a CPU, decode attention and the norms through the engine's own kernels
    (cpu_kernels.py: attention ~2x faster than SDPA's flash kernel at one query a row, and more exact, its
    probabilities kept in fp32; a norm in one pass), and in fp32 decode attention (~2x the batched matmuls it
    replaces), compiled with the machine's C++ compiler the first time
    (~10-30 s, then cached); torch's own ops where they cannot be built, or with False.
    """

    def __init__(
        self,
        backbone: Union[str, PreTrainedModel] = "smollm2-135m",
        tokenizer: Any = None,
        *,
        max_batch: int = 32,
        max_seq_len: int = 1024,
        max_prefill_tokens: int = 32,
        adapter_capacity: int = 64,
        max_waiting: Optional[int] = None,
        max_per_tenant: Optional[int] = None,
        dtype: Union[str, torch.dtype, None] = None,
        device: Optional[DeviceLike] = None,
        decode_graphs: str = "auto",
        fuse_projections: Optional[bool] = None,
        exact_gemms: bool = True,
        cpu_kernels: bool = True,
    ) -> None:
        if isinstance(backbone, str):
            device = canonical(device or "cpu")
            backbone, tokenizer = load_backbone(
                backbone, dtype=resolve_dtype(dtype or torch.float32, device), quiet=True
            )
            backbone.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types self as an argument
        elif device is not None and canonical(device) != next(backbone.parameters()).device:
            raise ValueError(
                f"the backbone is on {next(backbone.parameters()).device} but device={str(device)!r} was asked for; "
                "move the model first (model.to(...)) or pass the backbone's name"
            )
        elif (
            dtype is not None
            and resolve_dtype(dtype, next(backbone.parameters()).device) != next(backbone.parameters()).dtype
        ):
            raise ValueError(
                f"the backbone is {next(backbone.parameters()).dtype} but dtype={dtype!r} was asked for; "
                "cast the model first (model.to(...)) or pass the backbone's name"
            )
        if hasattr(backbone, "peft_config"):
            raise ValueError("pass the bare backbone to Engine and register adapters with add_adapter()")
        for name, value in (
            ("max_batch", max_batch),
            ("max_seq_len", max_seq_len),
            ("max_prefill_tokens", max_prefill_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {name} must be a positive integer, got {value!r}")
        if decode_graphs not in DECODE_GRAPHS:
            raise ValueError(f"Engine decode_graphs must be one of {list(DECODE_GRAPHS)}, got {decode_graphs!r}")
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"Engine max_waiting must be a non-negative integer or None, got {max_waiting!r}")
        if max_per_tenant is not None and (not isinstance(max_per_tenant, int) or max_per_tenant < 1):
            raise ValueError(f"Engine max_per_tenant must be a positive integer or None, got {max_per_tenant!r}")
        self.max_waiting, self.max_per_tenant = max_waiting, max_per_tenant
        config = backbone.config  # a family's fields are untyped on PreTrainedConfig: each is read once, here
        max_positions: int = config.max_position_embeddings
        max_seq_len = min(max_seq_len, max_positions)
        check_supported(backbone, max_seq_len)
        self.vocab_size: int = config.vocab_size
        self.n_kv_heads: int = config.num_key_value_heads
        self.model = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # Callers encode prompts on their own threads while the engine thread decodes outputs, and a fast
        # tokenizer must not be used by two threads at once: encoders share the tokenizer under this lock, the
        # engine thread decodes with its own copy, so decoding never waits for an encode (nor the reverse).
        self._tokenizer_lock = threading.Lock()
        self._decoder = _own_copy(tokenizer)
        self._token_bytes = token_bytes(self._decoder) if self._decoder is not None else lambda token: None
        self.dtype = next(backbone.parameters()).dtype
        self.device = next(backbone.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()  # a prefill's intermediates reuse freed memory, not fresh pages (host_memory.py)
        cuda = self.device.type == "cuda"
        self.graph_mode = {"auto": "capture" if cuda else None, "off": None, "padded": "padded"}[decode_graphs]
        if fuse_projections is None:
            fuse_projections = self.device.type != "cpu" or self.dtype == torch.bfloat16 or not exact_gemms
        self.fuse_projections = fuse_projections
        self.exact_gemms = exact_gemms
        self.cpu_kernels = cpu_kernels
        self.max_seq_len = max_seq_len
        self.spec = ModelSpec.of(backbone)
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.adapters = AdapterStore(self.spec, backbone, adapter_capacity, self.dtype)
        self.eos_ids = self._eos_ids()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pedro-adapter-load")
        self.restarts = 0
        self.reset_stats()
        self._build_state()

    def _build_state(self) -> None:
        """The per-request state: batch rows, KV cache, scheduler, in-flight adapter loads. Registrations are
        kept; this is all ``reset()`` rebuilds."""
        spec = self.spec
        self.rows = RowAdapters(spec, self.max_batch, self.adapters.capacity, self.dtype, self.device)
        self.adapters.on_load = self.rows.load_lora
        self.cache = KVCache(
            spec.n_layers,
            self.max_batch,
            self.n_kv_heads,
            self.max_seq_len,
            spec.head_dim,
            self.dtype,
            self.device,
            scratch=self.graph_mode is not None,
        )
        self.runner = ModelRunner(
            self.model,
            spec,
            self.cache,
            self.rows,
            fuse=self.fuse_projections,
            exact_gemms=self.exact_gemms,
            kernels=self.cpu_kernels,
        )
        if self.graph_mode is not None:
            self.runner.graphs = DecodeGraphs(self.runner, capture=self.graph_mode == "capture")
        self.scheduler = Scheduler(self.max_batch, self.max_prefill_tokens, self.adapters, spec.n_layers)
        self._seqs: dict[str, Sequence] = {}
        self._per_tenant: Counter[Optional[str]] = Counter()  # running + waiting requests per tenant
        self._loading: dict[str, Future] = {}

    def reset_stats(self) -> None:
        """Start ``stats`` afresh, the last STATS_WINDOW steps of each kind: "decode" (rows, seconds) for a step
        that only decodes, "prefill" (prompt tokens, seconds) for one that only prefills, "mixed" (rows, prompt
        tokens, seconds) for one that did both in one forward."""
        self.stats: dict[str, deque] = {kind: deque(maxlen=STATS_WINDOW) for kind in ("decode", "prefill", "mixed")}

    def reset(self, reason: str) -> list[RequestOutput]:
        """Fail every request the engine holds (``error_code`` ENGINE_FAILURE, ``error`` = ``reason``) and
        rebuild the per-request state; registered adapters stay registered (their weights reload on demand).
        -> the failed requests' final outputs. For recovering from a bug inside ``step()``."""
        failed = list(self._seqs.values())
        for seq in failed:
            seq.finish("error", reason, ENGINE_FAILURE)
        outputs = [self._output(seq) for seq in failed]
        self.adapters.clear_resident()
        self._build_state()
        self.restarts += 1
        return outputs

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else list(value or []))
        return ids

    # ------------------------------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, source: Union[str, Path, nn.Module]) -> dict[str, Any]:
        """Register an adapter from a PEFT directory (PEDRO, LoRA, IA3) or a PeftModel; it is checked against
        this backbone now and loaded when a request first uses it. -> its description."""
        self.adapters.add(name, source)
        return next(d for d in self.adapters.describe() if d["name"] == name)

    def remove_adapter(self, name: str) -> None:
        """Unregister ``name``; AdapterError while a running or waiting request uses it."""
        users = sum(1 for seq in self._seqs.values() if seq.request.adapter == name)
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {users} running or waiting request(s)")
        self.adapters.remove(name)

    def list_adapters(self) -> list[dict[str, Any]]:
        return self.adapters.describe()

    def prompt_format(self, name: str) -> Optional[str]:
        """How adapter ``name``'s training encoded prompts ("chat_template" or "raw", pedro.io), or None when
        that was not recorded; AdapterError for an unknown name."""
        return self.adapters.get(name).prompt_format

    def check_adapter(self, source: Union[str, Path, nn.Module]) -> dict[str, Any]:
        """A dry run of add_adapter: read ``source`` and check it against this backbone (config, tensor names,
        shapes) and materialise its weights exactly as serving will, without registering it ->
        ``{"kind", "parameters"}``; AdapterError says what does not fit or does not load."""
        plan, directory, state = self.adapters.plan(source)
        self.adapters.load("(checked adapter)", Registered("(checked adapter)", plan, directory, state))
        return {"kind": plan.kind, "parameters": plan.n_params}

    def pedro_state_bytes(self, name: str) -> int:
        """Bytes of per-request state a request with PEDRO adapter ``name`` keeps in its slot (its vectors)."""
        entry = self.adapters.get(name)
        if entry.kind != "pedro":
            raise AdapterError(f"adapter {name!r} is {entry.kind}, not PEDRO")
        widths = [s.end for s in plan_sites(entry.plan.config, self.model).values() if s.kind == "tap"]
        return sum(widths) * torch.finfo(self.dtype).bits // 8

    # ------------------------------------------------------------------------------------------ requests

    def encode(
        self,
        prompt: Union[str, list[int], list[dict[str, str]]],
        raw_prompt: bool = False,
        max_tokens: Optional[int] = None,
    ) -> list[int]:
        """The token ids the engine will run for ``prompt``: token ids as given; a string or chat messages
        encoded exactly as training encodes prompts (pedro.data.encode_prompt: the chat template when the
        backbone has one), or a string tokenized as-is with ``raw_prompt``. Raises RequestError for an empty
        or malformed prompt, PromptTooLong for one over ``max_tokens`` (default: what the context leaves room
        for) -- text far too long for that is refused by its length in characters, before tokenising."""
        limit = min(max_tokens or self.max_seq_len, self.max_seq_len - 1)
        if _is_token_ids(prompt):
            ids = list(prompt)
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        elif self.tokenizer is None:
            raise RequestError("this engine has no tokenizer: give the prompt as a list of token ids")
        elif isinstance(prompt, str) or _is_messages(prompt):
            if not prompt:
                raise RequestError("the prompt is empty")
            texts = [prompt] if isinstance(prompt, str) else [str(m["content"]) for m in prompt]
            if not all(_is_unicode(text) for text in texts):
                raise RequestError("the prompt is not valid Unicode (it holds a lone surrogate such as \\ud800)")
            chars = sum(len(text) for text in texts)
            if chars > limit * MAX_CHARS_PER_TOKEN:
                raise PromptTooLong(
                    f"the prompt has {chars} characters; at most {limit} tokens are allowed, and a prompt over "
                    f"{limit * MAX_CHARS_PER_TOKEN} characters is refused without tokenising it"
                )
            with self._tokenizer_lock:
                if isinstance(prompt, str) and raw_prompt:
                    ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
                else:  # exactly the tokens training saw for this prompt
                    ids = encode_prompt(self.tokenizer, prompt)
        else:
            raise RequestError(
                "a prompt must be a string, a list of chat messages {role, content}, or a list of token ids"
            )
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > limit:
            room = (
                ""
                if limit < self.max_seq_len - 1
                else f" (the context is {self.max_seq_len}, with room for one new token)"
            )
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; at most {limit} are allowed{room}")
        return ids

    def add_request(self, request: Request, track_text: bool = False) -> str:
        """Queue a request; raises RequestError (nothing queued) when it is invalid. ``track_text`` decodes
        text at every step (streaming); stop strings always do."""
        if not isinstance(request.sampling, SamplingParams):
            raise RequestError(f"Request.sampling must be SamplingParams, got {type(request.sampling).__name__}")
        if request.request_id in self._seqs:
            raise RequestError(f"request id {request.request_id!r} is already in the engine")
        if request.adapter is not None:
            self.adapters.get(request.adapter)  # UnknownAdapter, a RequestError naming the adapter
        if request.sampling.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer", field="stop")
        if any(t >= self.vocab_size for t, _ in request.sampling.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", field="logit_bias")
        if self.max_per_tenant is not None and self._per_tenant[request.tenant] >= self.max_per_tenant:
            raise TenantLimit(
                f"this tenant is at its own capacity: it already has {self.max_per_tenant} requests running or "
                "waiting (its limit); retry once some finish"
            )
        free_rows = self.max_batch - self.num_running  # requests the next step can admit are not queued
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting + free_rows:
            raise QueueFull(f"the engine's queue is full ({self.max_waiting} requests waiting); retry shortly")
        ids = self.encode(request.prompt, raw_prompt=request.raw_prompt)
        seed = request.sampling.seed if request.sampling.seed is not None else int(torch.randint(2**62, ()))
        track = self.tokenizer is not None and (track_text or bool(request.sampling.stop))
        seq = Sequence(request, ids, torch.Generator(self.device).manual_seed(seed), track_text=track)
        # a PEDRO layer's generator and a prompt's scores need all of its positions: split layer by layer
        seq.whole_prompt = request.sampling.prompt_logprobs is not None or (
            request.adapter is not None and self.adapters.get(request.adapter).kind == "pedro"
        )
        self._seqs[request.request_id] = seq
        self._per_tenant[request.tenant] += 1
        self.scheduler.add(seq)
        self._start_load(request.adapter)
        return request.request_id

    def _forget(self, seq: Sequence) -> None:
        if self._seqs.pop(seq.request.request_id, None) is not None:
            self._per_tenant[seq.request.tenant] -= 1
            if not self._per_tenant[seq.request.tenant]:
                del self._per_tenant[seq.request.tenant]

    def abort(self, request_id: str) -> None:
        """Cancel a request: a waiting one leaves the queue, a running one frees its slot at once."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return
        seq.finish("abort")
        if seq.slot is None:
            self.scheduler.remove_waiting(seq)
        else:
            self._retire(seq)
        self._forget(seq)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_admitted

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ------------------------------------------------------------------------------------------ adapter loads

    def _start_load(self, name: Optional[str]) -> None:
        if name is not None and name not in self._loading and self.adapters.needs_load(name):
            self._loading[name] = self._loader.submit(self.adapters.load, name)

    def _finish_loads(self) -> list[Sequence]:
        """Stage the adapters whose loads finished; -> the waiting sequences of those that failed, finished."""
        failed: list[Sequence] = []
        for name, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            try:
                self.adapters.stage(name, future.result())
            except AdapterError as err:
                for seq in [s for s in self.scheduler.waiting() if s.request.adapter == name]:
                    self.scheduler.remove_waiting(seq)
                    seq.finish("error", str(err), ADAPTER_LOAD_FAILED)
                    failed.append(seq)
        for seq in self.scheduler.waiting():  # e.g. evicted while its request waited
            self._start_load(seq.request.adapter)
        return failed

    # ------------------------------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Decode one token for every running row, admit and prefill waiting requests, retire the finished.
        -> an output for every request that produced tokens or finished in this step."""
        failed = self._finish_loads()
        progressed: list[Sequence] = []
        running = list(self.scheduler.running)
        tokens = upload([seq.output_ids[-1] for seq in running], self.device) if running else None
        pieces = self.scheduler.schedule()  # new rows take slots after the running ones: decoding is unaffected
        start = time.perf_counter()
        logits: torch.Tensor | None = None
        if pieces:
            prefilled, logits = self._prefill(pieces, tokens)
            progressed += [piece.seq for piece in pieces if piece.last or piece.seq.finished]
            if logits is None:
                self.stats["prefill"].append((prefilled, time.perf_counter() - start))
        if tokens is not None:
            # a step's time ends once its tokens are on the host (_accept reads them), so that on a GPU, where
            # kernels run after the call that queued them returns, it counts the device's work
            mixed = logits is not None
            if logits is None:
                start = time.perf_counter()
                logits = self.runner.decode(tokens)
            self._accept(running, logits)
            if mixed:
                self.stats["mixed"].append((len(running), prefilled, time.perf_counter() - start))
            else:
                self.stats["decode"].append((len(running), time.perf_counter() - start))
            progressed = running + progressed
        outputs = [self._output(seq) for seq in progressed + failed]
        for seq in progressed + failed:
            if seq.finished:
                if seq.slot is not None:
                    self._retire(seq)
                self._forget(seq)
        if not outputs and not self.scheduler.num_admitted and self._loading:  # idle until an adapter arrives
            wait(list(self._loading.values()), timeout=0.05, return_when=FIRST_COMPLETED)
        return outputs

    def _prefill(self, pieces: list[Piece], tokens: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
        """Run this step's prefill pieces (scheduler.py): rows joining the batch get their adapters, pieces by
        position run in one packed forward, a piece by layers on its own. Rows with the same prompt and adapter
        (``n`` samples of one prompt) prefilled whole in this step are prefilled once: the others copy its cache
        slot, vectors and prompt scores, then sample from the same logits with their own generators. A row whose
        prefill ends here gets its first token; one that asks for no new token finishes. ``tokens``: the running
        rows' last tokens, decoded in the same forward as the pieces by position when there are any. -> (the
        prompt tokens' worth of work that ran through the model, the decoding rows' logits or None)."""
        for src, dst in self.scheduler.moves:
            self.cache.move(src, dst)
            self.rows.move(src, dst)
        self.scheduler.moves.clear()
        for piece in pieces:
            if piece.seq.prefilled == 0:
                self.rows.assign(piece.seq.admitted_slot, piece.seq.entry)
        firsts: dict[tuple, Sequence] = {}
        copies: list[tuple[Sequence, Sequence]] = []
        runs: list[Piece] = []
        for piece in pieces:
            seq = piece.seq
            if not piece.by_layers and piece.start == 0 and piece.last:
                key = (seq.request.adapter, tuple(seq.prompt_ids))
                if key in firsts:
                    copies.append((seq, firsts[key]))
                    continue
                firsts[key] = seq
            if not piece.by_layers:
                runs.append(piece)
        scored: dict[int, int] = {}  # id(prefilled seq) -> the most prompt alternatives a row it serves asks for
        for seq, source in [(s, s) for s in firsts.values()] + copies:
            k = seq.request.sampling.prompt_logprobs
            if k is not None:
                scored[id(source)] = max(k, scored.get(id(source), 0))
        logits: torch.Tensor | None = None
        if runs and tokens is not None:
            results, logits = self._prefill_with_decode(runs, scored, tokens)
        else:
            results = self._prefill_isolated(runs, scored) if runs else {}
        for piece in pieces:
            if piece.by_layers:
                results.update(self._prefill_layers(piece))
            piece.seq.prefilled = piece.end
        for seq, source in copies:
            if id(source) in results:
                self.cache.copy(source.admitted_slot, seq.admitted_slot)
                self.rows.copy_vectors(source.admitted_slot, seq.admitted_slot)
                results[id(seq)] = results[id(source)]
            else:
                seq.finish("error", source.error, source.error_code)
        done = [piece.seq for piece in pieces if id(piece.seq) in results]
        for seq in done:
            self._describe_prompt(seq, results[id(seq)][1])
            if not seq.finished and seq.request.sampling.max_new_tokens == 0:
                seq.finish("length")
        sampled = [seq for seq in done if not seq.finished]
        if sampled:
            self._accept(sampled, torch.stack([results[id(seq)][0] for seq in sampled]))
        ran = [piece for piece in pieces if not any(piece.seq is seq for seq, _ in copies)]
        return round(sum(piece.cost for piece in ran) / self.spec.n_layers), logits

    def _prefill_with_decode(
        self, pieces: list[Piece], scored: dict[int, int], tokens: torch.Tensor
    ) -> tuple[dict[int, tuple[torch.Tensor, Optional[PromptScores]]], torch.Tensor]:
        """``_prefill_isolated`` and the decoding rows' step in one forward, which reads the weights once for
        both. If that forward raises, nothing says whose row caused it: the step is run the usual way, the
        decoding rows alone (their cache writes at their current lengths are simply redone) and then the prompts
        with the one-by-one fallback, so a failure stays with the request that fails on its own. -> (as
        ``_prefill_isolated``, the decoding rows' logits)."""
        batch = self._prefill_batch(pieces, scored)
        try:
            logits, prefill_logits = self.runner.run(tokens, batch)
        except Exception:
            return self._prefill_isolated(pieces, scored), self.runner.decode(tokens)
        assert logits is not None and prefill_logits is not None
        return self._prefill_results(pieces, batch, prefill_logits), logits

    def _prefill_batch(self, pieces: list[Piece], scored: dict[int, int]) -> PrefillBatch:
        seqs = [piece.seq for piece in pieces]
        return PrefillBatch(
            [s.admitted_slot for s in seqs],
            [piece.seq.prompt_ids[piece.start : piece.end] for piece in pieces],
            [scored.get(id(s)) for s in seqs],
            starts=[piece.start for piece in pieces],
        )

    @staticmethod
    def _prefill_results(
        pieces: list[Piece], batch: PrefillBatch, logits: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, Optional[PromptScores]]]:
        """(next-token logits, prompt scores or None) by id(seq), for the pieces whose prompt ends here."""
        return {id(p.seq): (row, batch.scores.get(i)) for i, (p, row) in enumerate(zip(pieces, logits)) if p.last}

    def _prefill_isolated(
        self, pieces: list[Piece], scored: dict[int, int]
    ) -> dict[int, tuple[torch.Tensor, Optional[PromptScores]]]:
        """Prefill ``pieces`` (by position) together, scoring the prompts of those in ``scored`` (id(seq) ->
        alternatives); if that raises, once more one by one, so that only a request that fails on its own is
        failed (its adapter's generator, say). -> (next-token logits, prompt scores or None) by id(seq), for the
        sequences whose prefill ends here."""
        batch = self._prefill_batch(pieces, scored)
        try:
            logits = self.runner.prefill(batch)
        except Exception as err:  # attributed to the request when it fails alone
            if len(pieces) == 1:
                pieces[0].seq.finish("error", f"the request failed at prefill: {err}", REQUEST_FAILED)
                return {}
            return {key: row for piece in pieces for key, row in self._prefill_isolated([piece], scored).items()}
        return self._prefill_results(pieces, batch, logits)

    def _prefill_layers(self, piece: Piece) -> dict[int, tuple[torch.Tensor, Optional[PromptScores]]]:
        """Run ``piece`` (a whole prompt through a range of layers); a failure fails its request alone. -> as
        ``_prefill_isolated``."""
        seq = piece.seq
        if seq.layered is None:
            seq.layered = LayeredPrefill(seq.admitted_slot, seq.prompt_ids, seq.request.sampling.prompt_logprobs)
        state = seq.layered
        state.slot = seq.admitted_slot  # it may have moved since its last piece
        try:
            logits = self.runner.prefill_layers(state, piece.end)
        except Exception as err:
            seq.finish("error", f"the request failed at prefill: {err}", REQUEST_FAILED)
            seq.layered = None
            return {}
        if logits is None:
            return {}
        seq.layered = None
        return {id(seq): (logits[0], state.scores)}

    def _describe_prompt(self, seq: Sequence, scores: Optional[PromptScores]) -> None:
        """What a request asked to know about its prompt: its text, and its tokens' log-probabilities (a prompt
        whose scores are not finite fails like any overflowing row)."""
        params = seq.request.sampling
        if params.return_prompt_text:
            seq.prompt_text = self._decode(seq.prompt_ids) if self.tokenizer is not None else ""
        if params.prompt_logprobs is None or scores is None:
            return
        if not torch.isfinite(scores.logprobs).all() or not torch.isfinite(scores.top_logprobs).all():
            adapter = f"its adapter {seq.request.adapter!r}" if seq.request.adapter else "the model"
            seq.finish(
                "error", f"numeric overflow: {adapter} produced non-finite logits for this prompt", NUMERIC_OVERFLOW
            )
            return
        k, prompt = params.prompt_logprobs, seq.prompt_ids
        entries = [TokenLogprob(prompt[0], None)] + [
            TokenLogprob(token, value, tuple(zip(ids[:k], values[:k])))
            for token, value, ids, values in zip(
                prompt[1:], scores.logprobs.tolist(), scores.top_ids.tolist(), scores.top_logprobs.tolist()
            )
        ]
        seq.prompt_logprobs = self._with_texts(
            entries, [prompt[max(0, i - LOGPROB_CONTEXT) : i] for i in range(len(prompt))]
        )

    def _retire(self, seq: Sequence) -> None:
        slot = seq.admitted_slot
        if seq.error is not None:  # its cache may hold inf/NaN, which masked attention would still multiply
            self.cache.clear(slot, len(seq.prompt_ids) + len(seq.output_ids))
        self.rows.release(slot)
        moved = self.scheduler.retire(seq)
        if moved is None:
            self.cache.lengths[slot] = 0
        else:
            self.cache.move(moved, slot)
            self.rows.move(moved, slot)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [s.request.sampling for s in seqs]
        tokens = sample(logits, params, [s.generator for s in seqs], [(s.prompt_ids, s.output_ids) for s in seqs])
        # (row, its token, its alternatives) of each row asking for logprobs
        wanted = [
            (i, t, p.logprobs)
            for i, (p, t) in enumerate(zip(params, tokens))
            if p.logprobs is not None and t is not None
        ]
        if wanted:
            asking = [i for i, _, _ in wanted]
            chosen = token_logprobs(logits[asking], [t for _, t, _ in wanted], [k for _, _, k in wanted])
            contexts = [seqs[i].output_ids[-LOGPROB_CONTEXT:] for i in asking]
            for i, logprob in zip(asking, self._with_texts(chosen, contexts)):
                seqs[i].logprobs.append(logprob)
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens):
            if token is None:
                adapter = f"its adapter {seq.request.adapter!r}" if seq.request.adapter else "the model"
                seq.finish(
                    "error",
                    f"numeric overflow: {adapter} produced non-finite logits for this request",
                    NUMERIC_OVERFLOW,
                )
                continue
            if seq.first_token is None:
                seq.first_token = now
            seq.output_ids.append(token)
            sampling = seq.request.sampling
            if token in self.eos_ids and not sampling.ignore_eos:
                seq.finish("stop")
            elif (
                len(seq.output_ids) >= sampling.max_new_tokens
                or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_seq_len
            ):
                seq.finish("length")
            if seq.track_text:
                self._update_text(seq)

    def _update_text(self, seq: Sequence) -> None:
        """Bring the text up to date and cut it at the first stop string (which then ends the request). While the
        request runs its text grows incrementally, constant work per token (detokenizer.py); once it has finished
        it is decoded whole, once, so the final text is exactly the tokenizer's decode of its ids."""
        previous = len(seq.text)
        if seq.finished:
            seq.text = self._decode(seq.output_ids)
        else:
            seq.text = seq.detokenizer.update(seq.output_ids, self._decode)
        stops = seq.request.sampling.stop
        if not stops:
            return
        horizon = max(0, previous - max(len(s) for s in stops) + 1)
        hits = [i for i in (seq.text.find(s, horizon) for s in stops) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            if seq.finish_reason is None or seq.finish_reason == "length":
                seq.finish("stop")

    def _with_texts(self, logprobs: list[TokenLogprob], contexts: list[list[int]]) -> list[TokenLogprob]:
        """Each of ``logprobs`` with the text each of its tokens adds after its ``context`` (the tokens just
        before it): what OpenAI's logprobs show as ``token``. Decoding after a few tokens of context, not alone,
        keeps the spaces and merged bytes a tokenizer's decoder puts between tokens, so the chosen tokens' texts
        concatenate to the text. Two batched decodes for the lot (a prompt's tokens are many).

        A token that holds part of a UTF-8 character (an emoji or CJK character split over byte-level tokens)
        adds no text; the one that completes the character adds all of it. Such a token keeps its own bytes in
        ``raw`` (``top_raw`` for the alternatives), for clients to join (read from the vocabulary: compat.token_bytes).
        """
        if self.tokenizer is None:
            return logprobs
        ids = [[logprob.token, *(t for t, _ in logprob.top)] for logprob in logprobs]
        after = iter(self._decode_many([seq for c, i in zip(contexts, ids) for seq in (c, *([*c, t] for t in i))]))
        alone = iter(self._decode_many([[t] for i in ids for t in i]))
        out = []
        for logprob, tokens, context in zip(logprobs, ids, contexts):
            before = next(after)
            texts = [
                a[len(before) :] if a.startswith(before) else x for a, x in ((next(after), next(alone)) for _ in tokens)
            ]
            raws = [self._token_bytes(t) for t in tokens]
            known = [self._token_bytes(t) for t in context[-4:]]  # an unfinished character spans at most 3 tokens
            if all(r is not None for r in raws + known):
                tail = b"".join(r for r in known if r is not None)
                pending = tail[len(tail) - incomplete_tail(tail) :]
                if pending or not all(is_text(r) for r in raws if r is not None):
                    texts = [added_text(pending, r) if r is not None else x for r, x in zip(raws, texts)]
            partial = [r if r is not None and not is_text(r) else None for r in raws]
            out.append(
                dataclasses.replace(
                    logprob, text=texts[0], top_text=tuple(texts[1:]), raw=partial[0], top_raw=tuple(partial[1:])
                )
            )
        return out

    def _decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens skipped; on the engine thread's own tokenizer copy, without a lock."""
        if self._decoder is not None:
            return self._decoder.decode(ids, skip_special_tokens=True)
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_many(self, batch: list[list[int]]) -> list[str]:
        """``_decode`` of each list of ids."""
        if self._decoder is not None:
            return self._decoder.batch_decode(batch, skip_special_tokens=True)
        with self._tokenizer_lock:
            return self.tokenizer.batch_decode(batch, skip_special_tokens=True)

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.finished and not seq.track_text and seq.error is None:
            seq.text = self._decode(seq.output_ids) if self.tokenizer else ""
        text = seq.text
        if not seq.finished:  # hold back what could still become a stop string or an incomplete character
            hold = max((len(s) for s in seq.request.sampling.stop), default=1) - 1
            text = text[: len(text) - hold].rstrip("\ufffd")
        delta_ids = seq.output_ids[seq.emitted_tokens :]
        delta_text = text[seq.emitted_chars :] if len(text) > seq.emitted_chars else ""
        seq.emitted_tokens = len(seq.output_ids)
        seq.emitted_chars = max(seq.emitted_chars, len(text))
        metrics = {}
        if seq.first_token is not None:
            metrics["ttft_s"] = seq.first_token - seq.arrival
        if seq.finished_at is not None:
            metrics["latency_s"] = seq.finished_at - seq.arrival
        if seq.admitted_at_step is not None:
            metrics["queued_steps"] = seq.admitted_at_step - seq.queued_at_step
        return RequestOutput(
            request_id=seq.request.request_id,
            adapter=seq.request.adapter,
            prompt_tokens=len(seq.prompt_ids),
            token_ids=list(seq.output_ids),
            text=seq.text if seq.finished else text,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            error_code=seq.error_code,
            metrics=metrics,
            logprobs=list(seq.logprobs) if seq.request.sampling.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs,
            prompt_text=seq.prompt_text,
        )

    # ------------------------------------------------------------------------------------------ offline

    def generate(
        self, requests: Iterable[Union[Request, str]], sampling: Optional[SamplingParams] = None
    ) -> list[RequestOutput]:
        """Run a list of requests to completion (continuous batching) -> one output per request, in order.
        A bad request gets an output with ``error`` set; the others run normally. The caller saw no earlier
        output, so each one's delta is the whole output (``delta_token_ids`` / ``delta_text`` equal ``token_ids``
        / ``text``)."""
        order: list[str] = []
        results: dict[str, RequestOutput] = {}
        for item in requests:
            request = item if isinstance(item, Request) else Request(item, sampling=sampling or SamplingParams())
            order.append(request.request_id)
            try:
                self.add_request(request)
            except RequestError as err:
                results[request.request_id] = RequestOutput(
                    request.request_id, request.adapter, 0, [], "", [], "", True, "error", str(err)
                )
        while any(rid not in results for rid in order):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = dataclasses.replace(
                        out, delta_token_ids=list(out.token_ids), delta_text=out.text
                    )
        return [results[rid] for rid in order]
