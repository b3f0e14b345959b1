"""The trainer: builds everything a recipe names, then trains epoch by epoch.

Read top to bottom: ``Trainer.__init__`` sets up processes, device, data, model, optimizer and
schedule; ``run`` trains, evaluates every epoch, writes metrics, curves and checkpoints (rank 0
only), and stops with a clear message on a non-finite loss, keeping the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import distributed
from ..cpu import threads_per_process
from ..data.datasets import build_datasets, build_loaders, describe_data
from ..errors import UserError
from ..io import atomic_write_text, remove_stale_temporaries
from ..models.factory import TORCHVISION_PREFIXES, ModelSpec, create_model_for_size
from ..optim import SGDPH
from ..recipe import Recipe, with_defaults
from ..surgery.rewrite import convert, example_input_for
from .loop import Diverged, DivergenceGuard, StepSettings, evaluate, train_one_epoch
from .metrics import DIVERGED, append_metrics, plot_curves, read_metrics, truncate_metrics, validation_rank
from .optimizers import build_optimizer, build_scheduler
from .state import load_training_state, save_training_state, set_rng_state

# Keys that may differ between a run and its resumption: freely (they change nothing computed) ...
_RESUME_FREE = {("trainer", "progress"), ("trainer", "log_every"), ("trainer", "threads"), ("data", "num_workers")}
# ... and with --allow-changes (the usual advice after a divergence: lower lr, clip, train longer).
# The rest -- model, data, seed, the optimizer's kind and estimator -- define the run: changing them
# is a new run, not a continuation.
RESUME_ADJUSTABLE = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "optimizer.so_lr",
    "optimizer.eps",
    "optimizer.hessian_momentum",
    "schedule.min_lr",
    "trainer.epochs",
    "trainer.grad_clip",
    "trainer.divergence_factor",
    "trainer.divergence_patience",
    "trainer.eval_batch_size",
)


def _log(message: str) -> None:
    if distributed.rank() == 0:
        print(message, flush=True)


def init_distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, created) from torchrun's environment; initialises the process
    group (NCCL on GPUs, gloo on CPUs) when there is more than one process and none exists yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        return rank, world, local_rank, True
    return rank, world, local_rank, False


def model_spec(recipe: Recipe, num_classes: int, in_chans: int) -> ModelSpec:
    """The recipe's model for the data's classes and channels. timm models take the data's channels
    (a model's own default may differ: small_cnn's is 1); torchvision's constructors have no
    in_chans and are 3-channel."""
    kwargs = {"num_classes": num_classes, **recipe.model.kwargs}
    if not recipe.model.name.startswith(TORCHVISION_PREFIXES) or in_chans != 3:
        kwargs = {"in_chans": in_chans, **kwargs}
    return ModelSpec.parse(recipe.model.name, **kwargs)


def _convert(model: nn.Module, recipe: Recipe, img_size: int):
    conv = recipe.model.conversion
    example = example_input_for(model, img_size)
    return convert(
        model,
        wn=conv.wn,
        strip_norm=conv.strip_norm,
        exclude=conv.exclude,
        example_input=example,
        add_bias=conv.add_bias,
    )


def check_buildable(recipe: Recipe) -> None:
    """What ``--dry-run`` adds to the recipe's own validation: the data's folders, the model's name and
    constructor arguments, the conversion and the optimizer, built as training builds them but
    without data or weights -- on the meta device, or on the CPU when the recipe converts the model
    (conversion traces it with real tensors). Raises the same one-line errors training would."""
    num_classes, in_chans, img_size = describe_data(recipe.data)
    spec = model_spec(recipe, num_classes, in_chans)
    conv = recipe.model.conversion
    converts = conv.wn or conv.strip_norm
    with torch.device("cpu" if converts else "meta"):
        try:
            model = create_model_for_size(spec, img_size)
        except (ValueError, RuntimeError, AssertionError) as exc:  # a value the architecture rejects
            raise UserError(f"cannot build '{spec.display_name}' with {recipe.model.kwargs}: {exc}") from exc
    if converts:
        model, _ = _convert(model, recipe, img_size)
    try:
        build_optimizer(recipe.optimizer, model)
    except (ValueError, TypeError) as exc:  # e.g. an optimizer.kwargs entry the optimizer does not take
        raise UserError(f"optimizer '{recipe.optimizer.name}': {exc}") from exc


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer: equal on all replicas iff they hold the same values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: bool = False, allow_changes: bool = False):
        self.recipe, t = recipe, recipe.trainer
        self.rank, self.world, local_rank, self._owns_process_group = init_distributed()
        if t.device == "cuda" and not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
        use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if t.precision == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
            raise UserError("trainer.precision=bf16 is not supported by this GPU; use fp16 or fp32")
        self.run_dir = Path(t.output_dir) / t.name
        # CPU threads: the usable CPUs split over the processes torchrun started on this machine.
        self.threads = t.threads or threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(self.threads)
        torch.manual_seed(t.seed)  # the same initial weights on every process

        # Data: the global batch is split over processes.
        self.data = build_datasets(recipe.data)
        self.loaders = build_loaders(
            self.data,
            recipe.data,
            t.batch_size,
            t.eval_batch_size or 2 * t.batch_size,
            seed=t.seed,
            rank=self.rank,
            world=self.world,
            pin_memory=use_cuda,
        )

        # Model: built by name for the data's classes and channels, converted when asked.
        self.spec = model_spec(recipe, self.data.num_classes, self.data.in_chans)
        model = create_model_for_size(self.spec, self.data.img_size)
        conv = recipe.model.conversion
        self.conversion = None
        if conv.wn or conv.strip_norm:
            model, report = _convert(model, recipe, self.data.img_size)
            self.conversion = {
                "wn": conv.wn,
                "strip_norm": conv.strip_norm,
                "exclude": list(conv.exclude),
                "layers": report.decoupled,
                "add_bias": report.add_bias,
            }
            _log(f"converted {self.spec.display_name}: {len(report.decoupled)} layers decoupled")
        self.model = model.to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

        # Optimizer, schedule, mixed precision.
        self.optimizer = build_optimizer(recipe.optimizer, self.model)
        if (
            self.world > 1
            and getattr(self.optimizer, "is_second_order", False)
            and not isinstance(self.optimizer, SGDPH)
        ):
            raise UserError(
                f"optimizer '{recipe.optimizer.name}' needs backward(create_graph=True), which DDP does "
                "not support; train it with one process"
            )
        self.scheduler = build_scheduler(
            recipe.schedule, self.optimizer, t.epochs, len(self.loaders.train), recipe.optimizer.lr
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        self.settings = StepSettings(self.device, t.precision, self.scaler, t.grad_clip, t.channels_last)
        self.start_epoch, self.best_val = 0, (float("-inf"), float("-inf"))  # validation_rank of best.pt
        self.guard = DivergenceGuard(t.divergence_factor, t.divergence_patience)
        if resume:
            self._resume(allow_changes)
        elif (self.run_dir / "last.pt").exists():
            raise UserError(
                f"{self.run_dir} already holds a run: continue it with --resume, or choose another "
                "trainer.name (or trainer.output_dir)"
            )

        # Processes and compilation wrap the model used for forward passes; self.model stays the
        # plain module whose state_dict is saved.
        self.net: nn.Module = self.model
        if self.world > 1:
            # DDP's default re-broadcasts rank 0's buffers (BatchNorm statistics) at every forward.
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if use_cuda else None
            )
        if t.compile:
            self.net = torch.compile(self.net)
        self.on_epoch_end: list[Callable[[int, dict], None]] = []  # hooks (tests use them to interrupt)

    # ------------------------------------------------------------------------- resume

    def _resume(self, allow_changes: bool) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise UserError(f"nothing to resume: {path} does not exist")
        state = load_training_state(path)
        # a checkpoint written before a recipe key existed ran with that key's default
        saved = with_defaults(state["recipe"])
        changed = _recipe_changes(saved, self.recipe.as_dict())
        fixed = [k for k in changed if k not in RESUME_ADJUSTABLE]
        if fixed:
            raise UserError(
                f"the recipe differs from the run being resumed in {', '.join(fixed[:4])}, which define the run "
                f"(only {', '.join(RESUME_ADJUSTABLE)} may change on resume): resume with the same recipe "
                "and overrides, or start a new run (another trainer.name)"
            )
        saved_world = state.get("world_size", self.world)
        if saved_world != self.world:
            changed = [*changed, "world_size"]
        if changed and not allow_changes:
            world = (
                f" (it was trained on {saved_world} process(es) and is resumed on {self.world}: the global batches "
                "stay the same, but BatchNorm statistics, kept per process, and the order of floating-point sums "
                "change, so the continuation is not bit-identical)"
                if "world_size" in changed
                else ""
            )
            raise UserError(
                f"the run being resumed differs in {', '.join(changed)}{world}: to continue with the new values "
                "add --allow-changes (the change is recorded in metrics.jsonl), or resume with the same recipe, "
                "overrides and process count"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.device)
        self.start_epoch, self.best_val = state["epoch"], (state["best_val_acc1"], -state["best_val_loss"])
        self.guard.reference = state.get("loss_reference")
        if self.rank == 0:  # (also drops a line torn by a kill during its write)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.start_epoch)
        if changed:
            self._apply_changes(saved, changed, self.start_epoch, saved_world)
        _log(f"resumed {self.run_dir} after epoch {self.start_epoch}")

    def _apply_changes(self, saved: dict, changed: list[str], epoch: int, saved_world: int) -> None:
        """Hyperparameters the checkpoint's optimizer and scheduler states restored at their old
        values get the recipe's new ones; the change is recorded in metrics.jsonl."""
        o = self.recipe.optimizer
        old_lr = saved["optimizer"]["lr"]
        if "optimizer.lr" in changed:  # the groups, and the scheduler's base values it multiplies
            factor = o.lr / old_lr
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        if {"optimizer.lr", "trainer.epochs", "schedule.min_lr"} & set(changed):
            # the lr at the resume point, from the new schedule (the restored one followed the old)
            step = self.scheduler.last_epoch
            for group, base, lr_lambda in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
            ):
                group["lr"] = base * lr_lambda(step)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        for key in ("weight_decay", "momentum", "so_lr", "eps", "hessian_momentum"):
            value = getattr(o, key)
            if f"optimizer.{key}" in changed and value is not None:
                for group in self.optimizer.param_groups:
                    if key == "weight_decay" and o.weight_decay_1d is not None and group["params"][0].ndim <= 1:
                        continue  # build_optimizer's group of 1-D parameters keeps weight_decay_1d
                    if key in group:
                        group[key] = value
        changes = {k: [_dotted(saved, k), _dotted(self.recipe.as_dict(), k)] for k in changed if k != "world_size"}
        if "world_size" in changed:
            changes["world_size"] = [saved_world, self.world]
        if self.rank == 0:
            append_metrics(self.run_dir / "metrics.jsonl", {"epoch": epoch, "event": "resumed", "changes": changes})
        _log(f"resuming with changes: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}")

    # ------------------------------------------------------------------------- run

    def run(self) -> list[dict]:
        try:
            return self._run()
        finally:
            # A gloo process that exits with its process group alive can abort at exit.
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> list[dict]:
        t = self.recipe.trainer
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.run_dir):  # left by a kill during a write
                _log(f"removed {stale.name}, a temporary file an interrupted write left behind")
            atomic_write_text(self.recipe.to_yaml(), self.run_dir / "recipe.yaml")
            (self.run_dir / DIVERGED).unlink(missing_ok=True)  # a new attempt: not diverged (yet)
        _log(
            f"training {self.spec.display_name} on {self.recipe.data.name} with {self.recipe.optimizer.name}: "
            f"{t.epochs} epochs, batch {t.batch_size}, {self.world} process(es) on {self.device.type} "
            f"({self.threads} CPU thread(s) each), {t.precision}; output {self.run_dir}"
        )
        progress = _Progress(enabled=t.progress and self.rank == 0, total=len(self.loaders.train))
        for epoch in range(self.start_epoch, t.epochs):
            self.loaders.sampler.set_epoch(epoch)
            start = time.perf_counter()
            progress.start(epoch, t.epochs)
            try:
                train = train_one_epoch(
                    self.net,
                    self.optimizer,
                    self.scheduler,
                    self.loaders.train,
                    self.settings,
                    epoch=epoch,
                    log_every=t.log_every,
                    on_progress=progress.update,
                    guard=self.guard,
                )
            except Diverged as exc:
                progress.stop()
                last = self.run_dir / "last.pt"
                kept = (
                    f"the last good checkpoint is {last} (after epoch {epoch})"
                    if last.exists()
                    else "no checkpoint was written yet"
                )
                fixes = "lower optimizer.lr" + (
                    " or optimizer.so_lr, raise optimizer.eps" if self.recipe.optimizer.name == "sgdph" else ""
                )
                message = (
                    f"{exc}; stopped, {kept}. Likely fixes: {fixes}, or set trainer.grad_clip "
                    "(then continue with --resume --allow-changes, or start over)"
                )
                if self.rank == 0:  # the run's folder says so: reports count it as diverged, sweeps do not retry it
                    atomic_write_text(message + "\n", self.run_dir / DIVERGED)
                raise type(exc)(message) from None
            progress.stop()
            val = evaluate(self.net, self.loaders.val, self.settings, "val") if self.loaders.val is not None else {}
            test = evaluate(self.net, self.loaders.test, self.settings, "test")
            row = {
                "epoch": epoch + 1,
                **train,
                **val,
                **test,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
            row["world_size"] = self.world  # processes: reports keep DDP and single-process runs apart
            if self.world > 1:
                row["replicas_in_sync"] = self._replicas_in_sync()
            self._end_epoch(epoch, row)
            for hook in self.on_epoch_end:
                hook(epoch, row)
        if self.world > 1:
            dist.barrier()  # every rank finished: rank 0's files are complete
        return read_metrics(self.run_dir / "metrics.jsonl") if self.rank == 0 else []

    def _end_epoch(self, epoch: int, row: dict) -> None:
        val = f"val top-1 {row['val_acc1']:.2f}%  " if "val_acc1" in row else ""
        _log(
            f"epoch {row['epoch']}/{self.recipe.trainer.epochs}  train loss {row['train_loss']:.4f}  {val}"
            f"test loss {row['test_loss']:.4f}  top-1 {row['test_acc1']:.2f}%  top-5 {row['test_acc5']:.2f}%  "
            f"lr {row['lr']:.3g}  {row['train_images_per_second']:.0f} img/s  {row['seconds']:.1f}s"
        )
        if self.rank != 0:
            return
        append_metrics(self.run_dir / "metrics.jsonl", row)
        plot_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "curves.png", self.run_dir.name)
        # best.pt is chosen on validation only; without a validation set there is none (the test set
        # is reported, never selected on).
        if self.guard.strikes:  # the loss is exploding right now: keep the last good checkpoint as it is
            _log(f"epoch {epoch + 1}: the training loss is far above its start; last.pt is not overwritten")
            return
        is_best = "val_acc1" in row and validation_rank(row) > self.best_val
        if is_best:
            self.best_val = validation_rank(row)
        state = dict(
            recipe=self.recipe.as_dict(),
            model_spec=self.spec.as_dict(),
            conversion=self.conversion,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            epoch=epoch + 1,
            best_val_acc1=self.best_val[0],
            best_val_loss=-self.best_val[1],
            device=self.device,
            loss_reference=self.guard.reference,
            world_size=self.world,
        )
        save_training_state(self.run_dir / "last.pt", **state)
        if is_best:
            save_training_state(self.run_dir / "best.pt", **state)

    def _replicas_in_sync(self) -> bool:
        prints = [None] * self.world
        dist.all_gather_object(prints, model_fingerprint(self.model))
        return len(set(prints)) == 1


def _dotted(recipe: dict, key: str):
    section, name = key.split(".")
    return recipe[section][name]


def _recipe_changes(saved: dict, current: dict, prefix: tuple = ()) -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        path = prefix + (key,)
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _recipe_changes(a, b, path)
        elif a != b and path not in _RESUME_FREE:
            changed.append(".".join(path))
    return changed


class _Progress:
    """A rich progress bar on rank 0 when stdout is a terminal; nothing otherwise (the per-epoch
    summary line is printed either way)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and sys.stdout.isatty()
        self.total, self._progress, self._task = total, None, None

    def start(self, epoch: int, epochs: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total, stats="")

    def update(self, iteration: int, stats: dict) -> None:
        if self._progress is not None:
            text = (
                f"loss {stats['loss']:.4f}  acc {stats['acc1']:.1f}%  lr {stats['lr']:.3g}  {stats['img_s']:.0f} img/s"
            )
            self._progress.update(self._task, completed=iteration, stats=text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
