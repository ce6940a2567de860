"""What a training run depends on (``TrainConfig``, saved in ``training_summary.json``), what it returns, and the
defaults ``pedro train`` applies when a setting is not given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pedro.config import PedroConfig
from pedro.data import OVERFLOW

METHODS = ("pedro", "lora", "ia3")
# peft's own (IA)3 placement for LLaMA-like models (the original paper's): keys, values, and the input of
# the FFN down-projection
IA3_DEFAULT_TARGETS = ("k", "v", "down")
IA3_FEEDFORWARD = ("down",)
SUMMARY_NAME = "training_summary.json"
LOG_NAME = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "eager", "sdpa")
OBJECTIVES = ("lm", "choice")
# attention="auto" picks eager attention under bf16 while a full batch's attention matrices (kept for the
# backward pass) stay under this many bytes; beyond it the backbone's own (memory-efficient) kernel is kept
EAGER_ATTENTION_BYTES = 4 << 30
# Learning rate per method when none is given. Chosen on dev splits carved from training data (never test data):
# results/quality_dev.md, made by benchmarks/quality.py --phase dev.
DEFAULT_LR = {"pedro": 1e-3, "lora": 1e-3, "ia3": 1e-2}
RATIONAL_LR = 3e-4  # bilevel: the rational coefficients' own rate when rational_lr is not given
# epochs=None: enough epochs for about this many optimizer steps, at most MAX_AUTO_EPOCHS (the dev split's
# best epoch is kept, so a few epochs too many cost time, not quality)
TARGET_STEPS = 300
MAX_AUTO_EPOCHS = 10
# dev_split=None: a dev split is carved from the training records when there are at least this many and no
# held-out data was given: DEV_FRACTION of them, between DEV_MIN and DEV_MAX records
DEV_FROM = 200
DEV_FRACTION = 0.1
DEV_MIN, DEV_MAX = 32, 500


# (field, lowest value, how the error says it) for the numeric fields that have a floor (None passes: a default)
_BOUNDS = (
    ("limit", 1, "a positive number of records"),
    ("r", 1, "a positive rank"),
    ("lora_r", 1, "a positive rank"),
    ("batch_size", 1, "at least 1"),
    ("grad_accum", 1, "at least 1"),
    ("max_length", 2, "at least 2 tokens"),
    ("lr", 0, "a learning rate of 0 or more"),
    ("bias_lr", 0, "a learning rate of 0 or more"),
    ("rational_lr", 0, "a learning rate of 0 or more"),
    ("weight_decay", 0, "0 or more"),
    ("warmup", 0, "0 or more"),
    ("logging_steps", 1, "at least 1"),
    ("eval_steps", 0, "0 (every epoch) or a positive step count"),
    ("save_steps", 0, "0 (no step checkpoints) or a positive step count"),
    ("save_total_limit", 1, "at least 1"),
    ("early_stopping", 0, "0 (off) or a patience of at least 1"),
)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in ``training_summary.json``."""

    data: str = ""
    output_dir: str = ""
    backbone: Optional[str] = None  # None: the default backbone, or the model passed to train()
    method: str = "pedro"
    data_dir: Optional[str] = None  # where task data lives when ``data`` is a task name
    eval_data: Optional[str] = None  # held-out records for periodic evaluation (loss, and accuracy for choices)
    # records carved (seeded) from the training data to evaluate every epoch and keep the best epoch's adapter:
    # None = automatic (see DEV_FROM), 0 = none, a fraction (< 1) or a record count
    dev_split: Optional[float] = None
    limit: Optional[int] = None  # use the first N training records (after a seeded shuffle)
    # PEDRO
    r: int = 8
    pooler: str = "last"
    activation: str = "gelu"
    targets: tuple[str, ...] = ("q", "v", "up")
    pool_source: str = "normed"
    share_generator: bool = False
    normalize_pooled: bool = False
    scale_bound: Optional[float] = None
    rational_lr: Optional[float] = None  # learning rate of the rational activation's coefficients
    bias_lr: Optional[float] = None  # learning rate of the generators' Up bias (the prompt-independent scale part)
    # rational coefficients trained on dev-split batches, the generators on training batches, alternating at every
    # step (first-order DARTS, as the papers do); needs activation="rational" and held-out data
    bilevel: bool = False
    # LoRA / (IA)3
    lora_r: int = 8
    lora_alpha: Optional[int] = None  # default 2 * lora_r
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")
    ia3_targets: tuple[str, ...] = IA3_DEFAULT_TARGETS
    match_params: Optional[str] = None  # "pedro" or a parameter count: size this method to it
    # data
    # "lm": the causal-LM loss on the response tokens; "choice" (choice data whose options are one token each):
    # cross-entropy over the options' logits at the prompt's last token, the ranking evaluation scores by
    objective: str = "lm"
    max_length: int = 512
    overflow: str = "truncate"
    padding_side: str = "right"
    # optimisation
    epochs: Optional[float] = None  # None: auto_epochs(training records)
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup: float = 0.06  # ratio of the steps (<1) or a step count
    precision: str = "auto"  # auto (bf16 where the hardware has it natively, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    # speed (none of these changes what is learned beyond floating-point rounding, except group_by_length,
    # which changes which rows share a batch)
    group_by_length: bool = True  # batches of similar-length rows (little padding), in a random batch order
    response_logits_only: bool = True  # the LM head runs only at the positions the loss reads
    attention: str = "auto"  # auto (eager under bf16 when it fits, else the backbone's) | eager | sdpa
    threads: Optional[int] = None  # torch CPU threads during training (None: torch's default)
    # logging, evaluation, checkpoints
    logging_steps: int = 10
    eval_steps: int = 0
    early_stopping: int = 0  # patience in evaluations; 0 = off
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = False
    report_to: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.dev_split is not None and (
            self.dev_split < 0 or (self.dev_split >= 1 and self.dev_split != int(self.dev_split))
        ):
            raise ValueError(f"dev_split must be 0, a fraction below 1 or a whole record count, got {self.dev_split}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name, low, what in _BOUNDS:
            value = getattr(self, name)
            if value is not None and not value >= low:
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps must be -1 (train the epochs) or a positive step count, got {self.max_steps}")
        if self.match_params is not None and self.match_params != "pedro":
            if not (str(self.match_params).isdigit() and int(self.match_params) > 0):
                raise ValueError(
                    f"match_params must be 'pedro' or a positive parameter count, got {self.match_params!r}"
                )
        for name in ("targets", "lora_targets", "ia3_targets", "report_to"):
            value = getattr(self, name)
            setattr(self, name, tuple(value.split(",")) if isinstance(value, str) else tuple(value))
        from transformers.trainer_utils import SchedulerType

        schedulers = [kind.value for kind in SchedulerType]
        if self.scheduler not in schedulers:
            raise ValueError(f"scheduler must be one of {schedulers}, got {self.scheduler!r}")
        if self.method == "pedro":
            _pedro_config(self)  # a bad PEDRO knob is refused now, not after the backbone has loaded
        if self.bilevel and (self.method != "pedro" or self.activation != "rational"):
            raise ValueError(
                "bilevel optimises PEDRO's rational activation: it needs method pedro, activation rational"
            )


# The options only one method reads; set for another method they would be silently ignored.
METHOD_OPTIONS = {
    "pedro": (
        "r",
        "pooler",
        "activation",
        "targets",
        "pool_source",
        "share_generator",
        "normalize_pooled",
        "scale_bound",
        "rational_lr",
        "bias_lr",
        "bilevel",
    ),
    "lora": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "ia3": ("ia3_targets",),
}
SIZE_OPTION = {"pedro": "r", "lora": "lora_r", "ia3": "ia3_targets"}  # what match_params chooses


def check_options_read(cfg: TrainConfig) -> None:
    """Refuse options set away from their defaults that the run would not read: another method's (PEDRO's
    do count under ``match_params="pedro"``, where they define the budget), or the size ``match_params`` picks."""
    defaults = TrainConfig(method=cfg.method)
    others = [
        f"{name} ({method})"
        for method, names in METHOD_OPTIONS.items()
        if method != cfg.method and not (method == "pedro" and cfg.match_params == "pedro")
        for name in names
        if getattr(cfg, name) != getattr(defaults, name)
    ]
    if others:
        raise ValueError(
            f"{', '.join(others)}: not read by method {cfg.method}, which reads {', '.join(METHOD_OPTIONS[cfg.method])}"
        )
    size = SIZE_OPTION[cfg.method]
    if cfg.match_params is not None and getattr(cfg, size) != getattr(defaults, size):
        raise ValueError(f"{size} is chosen by match_params: give one or the other")


@dataclass
class TrainResult:
    """Where the adapter was written and what the run measured; ``model`` is the trained PeftModel (the adapter
    kept, in eval mode) around the backbone that was passed in or loaded, ready to evaluate or generate with."""

    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    model: Any = None


def _pedro_config(cfg: TrainConfig, r: int | None = None) -> PedroConfig:
    return PedroConfig(
        r=cfg.r if r is None else r,
        pooler=cfg.pooler,
        activation=cfg.activation,
        targets=list(cfg.targets),
        pool_source=cfg.pool_source,
        share_generator=cfg.share_generator,
        normalize_pooled=cfg.normalize_pooled,
        scale_bound=cfg.scale_bound,
    )
