"""The recipe schema: five sections, each a dataclass whose fields (with their defaults) are the
complete list of keys. A field's metadata says where it applies and what values make sense:

- ``applies_to``: the section ``name`` choices that use the key (a recipe that sets it for another
  choice is rejected: it would be silently ignored); absent: every choice.
- ``at_least``: an integer key's minimum; ``interval``: a number's range ``(low, high, closed_low,
  closed_high)``; ``None`` (null) always passes both.

:func:`~sgdph_tools.recipe.validation.validate` reads them; ``docs/training.md`` documents every key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..curvature.capabilities import ENGINES, ESTIMATORS

INF = math.inf
SGDPH_ONLY = ("sgdph",)
HF_ONLY = ("block_hf",)
ADAM_LIKE = ("adam", "adamw", "adabelief", "adahessian")


def key(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    applies_to: tuple[str, ...] | None = None,
    at_least: int | None = None,
    interval: tuple[float, float, bool, bool] | None = None,
) -> Any:
    """A recipe key: its default (or ``factory``) and its metadata (module docstring)."""
    metadata = {
        name: value
        for name, value in (("applies_to", applies_to), ("at_least", at_least), ("interval", interval))
        if value is not None
    }
    return field(default=default, default_factory=factory, metadata=metadata)


def closed_open(low: float, high: float) -> tuple[float, float, bool, bool]:
    return (low, high, True, False)


def open_open(low: float, high: float) -> tuple[float, float, bool, bool]:
    return (low, high, False, False)


@dataclass
class ConversionCfg:
    wn: bool = False  # decouple every conv/linear that feeds no norm (sgdph convert --wn)
    strip_norm: bool = False  # replace every norm layer by an identity first
    exclude: list[str] = key(factory=list)  # fnmatch patterns of layers to leave alone
    add_bias: bool | None = None  # bias for decoupled layers that have none; null: only with strip_norm


@dataclass
class ModelCfg:
    name: str = "small_cnn"  # timm name, this project's models, or torchvision:NAME
    kwargs: dict[str, Any] = key(factory=dict)  # constructor kwargs (drop_rate, ...)
    conversion: ConversionCfg = key(factory=ConversionCfg)


@dataclass
class DataCfg:
    name: Literal["digits", "shapes", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    # dataset folder (cifar*, imagefolder)
    root: str | None = key(None, applies_to=("cifar10", "cifar100", "imagefolder"))
    download: bool = key(False, applies_to=("cifar10", "cifar100"))  # cifar*: download into root when missing
    img_size: int | None = key(None, at_least=1)  # default: digits 8, cifar 32, imagefolder 224, synthetic 32
    num_workers: int = key(2, at_least=0)  # DataLoader worker processes (0: load in the main process)
    train_dir: str = key("train", applies_to=("imagefolder",))  # imagefolder: sub-folders of root
    val_dir: str = key("val", applies_to=("imagefolder",))
    augment: bool = True  # the dataset's standard training augmentation
    # held out of the training data, stratified, fixed; 0: no validation set
    val_fraction: float = key(0.1, interval=closed_open(0, 1))
    num_classes: int = key(10, applies_to=("synthetic",), at_least=1)
    channels: int = key(3, applies_to=("synthetic",), at_least=1)
    # generated training / test images: shapes (default 20000 / 2000), synthetic (512 / 128)
    num_train: int | None = key(None, applies_to=("shapes", "synthetic"), at_least=1)
    num_test: int | None = key(None, applies_to=("shapes", "synthetic"), at_least=1)


@dataclass
class OptimizerCfg:
    name: Literal["sgdph", "sgd", "adam", "adamw", "adabelief", "adahessian", "apollo", "block_hf"] = "sgdph"
    lr: float = key(0.01, interval=open_open(0, INF))
    weight_decay: float = key(0.0, interval=closed_open(0, INF))
    # of the 1-D parameters (biases, norm gains, WN gammas); null: weight_decay (the paper's runs);
    # 0: none, as timm's factory does by default (filter_bias_and_bn)
    weight_decay_1d: float | None = key(None, interval=closed_open(0, INF))
    momentum: float = key(0.9, applies_to=("sgd", "sgdph"), interval=closed_open(0, 1))
    betas: list[float] | None = key(None, applies_to=ADAM_LIKE)  # None: the optimizer's default
    # None: the optimizer's default (sgdph: per rule, 0.3 normalized, 1e-4 paper; adam 1e-8)
    eps: float | None = key(None, applies_to=(*SGDPH_ONLY, *ADAM_LIKE, "apollo"), interval=open_open(0, INF))
    # SGD-PH only:
    so_lr: float = key(1e-3, applies_to=SGDPH_ONLY, interval=closed_open(0, INF))
    hessian_momentum: float = key(0.9, applies_to=SGDPH_ONLY, interval=closed_open(0, 1))
    # gnb (with gnb_fraction 0.25) since the study of docs/evidence.md; the paper's: rowsum
    estimator: Literal[ESTIMATORS] = key("gnb", applies_to=SGDPH_ONLY)  # names: sgdph_tools.curvature
    engine: Literal[ENGINES] = key("autograd", applies_to=SGDPH_ONLY)
    # 10 since the refresh-interval study of docs/evidence.md (within the seed noise of every step, cheapest)
    hessian_every: int = key(10, applies_to=SGDPH_ONLY, at_least=1)
    # estimator=gnb: its own forward on this fraction of the batch (null: the step's logits); other estimators: null
    gnb_fraction: float | None = key(0.25, applies_to=SGDPH_ONLY, interval=(0, 1, False, True))
    # the authors' released update rule, step for step (docs/algorithm.md)
    authors_code: bool = key(False, applies_to=SGDPH_ONLY)
    # how the curvature scales the step; normalized since the study of docs/evidence.md (paper: Algorithm 1);
    # block_newton: a solve on each tensor's Gauss-Newton block (estimator gnb: its estimate, refreshed every
    # hessian_every steps; engine gauss_newton: exact, by CG at every step -- hessian_every is read as 1)
    # block_normalized: the same blocks at SGD's step length per tensor (ε relative to the block's mean diagonal)
    rule: Literal["paper", "damped", "normalized", "block_newton", "block_normalized"] = key(
        "normalized", applies_to=SGDPH_ONLY
    )
    cg_steps: int = key(10, applies_to=SGDPH_ONLY, at_least=1)  # block_newton, engine gauss_newton: CG products
    block_max: int = key(512, applies_to=SGDPH_ONLY, at_least=0)  # block_newton: larger tensors keep a diagonal
    # block_newton, estimator gnb: the block estimate from this many chunks of rows (null: one per row, per example)
    block_chunks: int | None = key(None, applies_to=SGDPH_ONLY, at_least=1)
    second_order_kinds: list[str] | None = key(None, applies_to=SGDPH_ONLY)  # None: every channel-wise 1-D kind
    # block_hf only (BlockHessianFree: one CG per layer's GGN block; optimizer.lr scales the solved step, 1.0: the
    # step itself; weight_decay is an L2 term of the objective; momentum, cg_init_decay: optimizer.kwargs)
    damping: float = key(1.0, applies_to=HF_ONLY, interval=open_open(0, INF))  # λ at the start
    adapt_damping: bool = key(True, applies_to=HF_ONLY)  # Levenberg-Marquardt rule (false: λ fixed)
    cg_max_iters: int = key(20, applies_to=HF_ONLY, at_least=1)  # GGN products per block and step, at most
    cg_tol: float = key(1e-3, applies_to=HF_ONLY, interval=(0, 1, True, True))  # CG's relative residual
    backtracking: bool = key(False, applies_to=HF_ONLY)  # Martens' backtracking over CG iterates
    curvature_fraction: float | None = key(None, applies_to=HF_ONLY, interval=(0, 1, False, True))  # null: all
    kwargs: dict[str, Any] = key(factory=dict)  # anything else the optimizer takes


@dataclass
class ScheduleCfg:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = key(factory=lambda: [60, 120, 180], applies_to=("multistep",))  # epochs
    gamma: float = key(0.1, applies_to=("multistep",), interval=open_open(0, INF))  # factor at each milestone
    min_lr: float = key(0.0, applies_to=("cosine",))  # cosine: final learning rate, in [0, optimizer.lr]
    warmup_epochs: float = key(0.0, interval=closed_open(0, INF))  # linear warmup from warmup_factor·lr
    warmup_factor: float = key(0.1, interval=(0, 1, False, True))


@dataclass
class TrainerCfg:
    epochs: int = key(200, at_least=1)
    batch_size: int = key(128, at_least=1)  # global: split across processes
    eval_batch_size: int | None = key(None, at_least=1)  # default: 2 x batch_size
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast; fp16: autocast + GradScaler
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run folder name; default: the recipe's file name and the seed
    channels_last: bool = False
    compile: bool = False  # torch.compile the model, and sgdph's update (not with double backward)
    # torch.compile's mode: reduce-overhead replays the compiled graphs as CUDA graphs (GPU launch overhead)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    # processes (--nproc, torchrun): ddp replicates the model in each; fsdp shards parameters, gradients and
    # optimizer state across them (FSDP2, fully_shard per block and the root; docs/training.md)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    grad_clip: float | None = key(None, interval=open_open(0, INF))  # max gradient norm
    # CPU threads per process; null: the usable CPUs split over this machine's processes
    threads: int | None = key(None, at_least=1)
    # stop when the loss stays above this x its start (null: off) ...
    divergence_factor: float | None = key(10.0, interval=open_open(1, INF))
    divergence_patience: int = key(3, at_least=1)  # ... for this many progress checks (log_every iterations each)
    log_every: int = key(10, at_least=1)  # progress refresh, iterations
    progress: bool = True  # a live progress bar when attached to a terminal


@dataclass
class Recipe:
    model: ModelCfg = key(factory=ModelCfg)
    data: DataCfg = key(factory=DataCfg)
    optimizer: OptimizerCfg = key(factory=OptimizerCfg)
    schedule: ScheduleCfg = key(factory=ScheduleCfg)
    trainer: TrainerCfg = key(factory=TrainerCfg)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, applicable_only: bool = False) -> str:
        """Every key (what a run records); ``applicable_only``: without the keys the chosen
        optimizer, schedule and dataset do not use (what ``--dry-run`` shows)."""
        data = applicable_settings(self.as_dict()) if applicable_only else self.as_dict()
        return yaml.safe_dump(data, sort_keys=False)


SECTIONS = {
    "model": ModelCfg,
    "data": DataCfg,
    "optimizer": OptimizerCfg,
    "schedule": ScheduleCfg,
    "trainer": TrainerCfg,
}

#: Keys that mean something only for some choices of a section's ``name`` (from the fields' metadata).
APPLIES_TO: dict[str, dict[str, tuple[str, ...]]] = {
    section: {f.name: f.metadata["applies_to"] for f in dataclasses.fields(cls) if "applies_to" in f.metadata}
    for section, cls in SECTIONS.items()
}
APPLIES_TO = {section: rules for section, rules in APPLIES_TO.items() if rules}


def applicable_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe (as a dict) without the keys its choices do not use (``APPLIES_TO``; and
    ``gnb_fraction`` unless the estimator is gnb): what makes two runs the same experiment, whatever
    the defaults of unused keys were when each was recorded."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, rules in APPLIES_TO.items():
        if not isinstance(data.get(section), dict):
            continue
        name = data[section].get("name")
        for name_key, names in rules.items():
            if name not in names:
                data[section].pop(name_key, None)
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("estimator", "gnb") != "gnb":
        optimizer.pop("gnb_fraction", None)
    return data


#: Keys whose default changed after they were introduced, with the value a recorded recipe that predates
#: the key ran with (``optimizer.rule`` came with the paper's rule as its default; it is ``normalized`` since
#: the study; ``hessian_every`` was 1 until the refresh-interval study). ``with_defaults`` fills these in instead
#: of today's default, and a recorded run of another optimizer may list them at those values.
RAN_WITH_BEFORE = {"optimizer": {"rule": "paper", "estimator": "rowsum", "gnb_fraction": None, "hessian_every": 1}}


def with_defaults(recorded: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recorded recipe (a run's ``recipe.yaml``, a sweep's ``base.yaml``) with the keys it
    predates filled in with the behaviour it ran with -- today's defaults, except for the keys whose
    default has changed since (``RAN_WITH_BEFORE``) -- so that it compares equal to a newer recipe of
    the same settings. Recorded keys are kept as they are."""
    if defaults is None:
        defaults = Recipe().as_dict()
        for section, keys in RAN_WITH_BEFORE.items():
            chosen = recorded.get(section, {}).get("name") if isinstance(recorded.get(section), dict) else None
            for name_key, value in keys.items():  # only where the key applies (a recorded SGDM run has no rule)
                if chosen in APPLIES_TO.get(section, {}).get(name_key, (chosen,)):
                    defaults[section][name_key] = value
    merged = dict(defaults)
    for name_key, value in recorded.items():
        if isinstance(value, dict) and isinstance(defaults.get(name_key), dict) and defaults[name_key]:
            merged[name_key] = with_defaults(value, defaults[name_key])
        else:
            merged[name_key] = value
    return merged
