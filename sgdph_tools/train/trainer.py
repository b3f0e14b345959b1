"""The trainer: builds everything a recipe names, then trains epoch by epoch.

Read top to bottom: ``Trainer.__init__`` sets up processes, device, data, model (:mod:`.build`),
optimizer and schedule, and resumes (:mod:`.resume`); ``run`` trains, evaluates every epoch, writes
metrics, curves and checkpoints (rank 0 only), and stops with a clear message on a non-finite loss,
keeping the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..cpu import threads_per_process
from ..data.datasets import build_datasets, build_loaders
from ..errors import UserError
from ..io import atomic_write_text, remove_stale_temporaries
from ..models.factory import create_model_for_size
from ..optim import SGDPH
from ..recipe import Recipe
from .build import check_buildable, convert_for_recipe, init_distributed, model_spec, training_device
from .lock import FolderLock
from .loop import Diverged, DivergenceGuard, StepSettings, evaluate, train_one_epoch
from .metrics import DIVERGED, append_metrics, plot_curves, read_metrics, validation_rank
from .optimizers import build_optimizer, build_scheduler
from .progress import Progress, log
from .resume import RESUME_ADJUSTABLE, restore_run, set_aside_earlier_files
from .sharding import agree_on_buffers, remove_unreferenced, save_sharded, shard_model, sharded_folder
from .state import save_training_state

__all__ = ["RESUME_ADJUSTABLE", "Trainer", "check_buildable", "model_fingerprint"]


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
        self.sharded = t.strategy == "fsdp"  # FSDP2 (sharding.py); otherwise DDP past one process
        self.rank, self.world, local_rank, self._owns_process_group = init_distributed(always=self.sharded)
        self.device = training_device(recipe, local_rank)
        use_cuda = self.device.type == "cuda"
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
            model, report = convert_for_recipe(model, recipe, self.data.img_size)
            self.conversion = {
                "wn": conv.wn,
                "strip_norm": conv.strip_norm,
                "exclude": list(conv.exclude),
                "layers": report.decoupled,
                "add_bias": report.add_bias,
            }
            log(f"converted {self.spec.display_name}: {len(report.decoupled)} layers decoupled")
        if self.sharded:  # before the optimizer sees the parameters; on a GPU, the shards go to it (not the whole)
            self.model = shard_model(model, t.precision, self.device)
        else:
            self.model = model.to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._best_folder: str | None = None  # the DCP folder best.pt names (fsdp)

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
        self.settings = StepSettings(self.device, t.precision, self.scaler, t.grad_clip, t.channels_last, self.sharded)
        self.start_epoch, self.best_val = 0, (float("-inf"), float("-inf"))  # validation_rank of best.pt
        self.guard = DivergenceGuard(t.divergence_factor, t.divergence_patience, num_classes=self.data.num_classes)
        if not resume and (self.run_dir / "last.pt").exists():
            raise UserError(
                f"{self.run_dir} already holds a run: continue it with --resume, or choose another "
                "trainer.name (or trainer.output_dir)"
            )
        # one writer per run folder (rank 0 writes it), from before the resume rewrites metrics.jsonl
        self.lock = FolderLock(self.run_dir, "sgdph train", "wait for it, or choose another trainer.name")
        if self.rank == 0:
            self.lock.acquire()
        try:
            if resume:
                restore_run(self, allow_changes)
            elif self.rank == 0:
                set_aside_earlier_files(self.run_dir)
        except BaseException:
            self.lock.release()
            raise

        # Processes and compilation wrap the model used for forward passes; self.model stays the
        # plain module whose state_dict is saved.
        self.net: nn.Module = self.model
        if self.world > 1 and not self.sharded:
            # DDP's default re-broadcasts rank 0's buffers (BatchNorm statistics) at every forward.
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if use_cuda else None
            )
        if t.compile:  # forward and backward (AOTAutograd); SGD-PH's repeating update too (optim/compiled.py)
            self.net = torch.compile(self.net, mode=t.compile_mode)
            if isinstance(self.optimizer, SGDPH):  # under FSDP2 its update stays eager (optim/compiled.py)
                self.optimizer.compile_update(t.compile_mode)
        self.on_epoch_end: list[Callable[[int, dict], None]] = []  # hooks (tests use them to interrupt)

    # ------------------------------------------------------------------------- resume

    # ------------------------------------------------------------------------- run

    def run(self) -> list[dict]:
        try:
            return self._run()
        finally:
            self.lock.release()
            # A gloo process that exits with its process group alive can abort at exit.
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> list[dict]:
        t = self.recipe.trainer
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.run_dir):  # left by a kill during a write
                log(f"removed {stale.name}, a temporary file an interrupted write left behind")
            atomic_write_text(self.recipe.to_yaml(), self.run_dir / "recipe.yaml")
            (self.run_dir / DIVERGED).unlink(missing_ok=True)  # a new attempt: not diverged (yet)
        log(
            f"training {self.spec.display_name} on {self.recipe.data.name} with {self.recipe.optimizer.name}: "
            f"{t.epochs} epochs, batch {t.batch_size}, {self.world} process(es) ({self._strategy_words()}) "
            f"on {self.device.type} "
            f"({self.threads} CPU thread(s) each), {t.precision}; output {self.run_dir}"
        )
        progress = Progress(enabled=t.progress and self.rank == 0, total=len(self.loaders.train))
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
                own = {"sgdph": " or optimizer.so_lr, raise optimizer.eps", "block_hf": ", raise optimizer.damping"}
                fixes = "lower optimizer.lr" + own.get(self.recipe.optimizer.name, "")
                message = (
                    f"{exc}; stopped, {kept}. Likely fixes: {fixes}, or set trainer.grad_clip "
                    "(then continue with --resume --allow-changes, or start over)"
                )
                if self.rank == 0:  # the run's folder says so: reports count it as diverged, sweeps do not retry it
                    atomic_write_text(message + "\n", self.run_dir / DIVERGED)
                raise type(exc)(message) from None
            progress.stop()
            if self.sharded:  # one set of BatchNorm statistics to evaluate and save (sharding.py)
                agree_on_buffers(self.model)
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
            row["strategy"] = self.recipe.trainer.strategy
            if self.world > 1 and not self.sharded:  # FSDP's processes hold different shards by design
                row["replicas_in_sync"] = self._replicas_in_sync()
            self._end_epoch(epoch, row)
            for hook in self.on_epoch_end:
                hook(epoch, row)
        if self.world > 1:
            dist.barrier()  # every rank finished: rank 0's files are complete
        return read_metrics(self.run_dir / "metrics.jsonl") if self.rank == 0 else []

    def _end_epoch(self, epoch: int, row: dict) -> None:
        val = f"val top-1 {row['val_acc1']:.2f}%  " if "val_acc1" in row else ""
        log(
            f"epoch {row['epoch']}/{self.recipe.trainer.epochs}  train loss {row['train_loss']:.4f}  {val}"
            f"test loss {row['test_loss']:.4f}  top-1 {row['test_acc1']:.2f}%  top-5 {row['test_acc5']:.2f}%  "
            f"lr {row['lr']:.3g}  {row['train_images_per_second']:.0f} img/s  {row['seconds']:.1f}s"
        )
        if self.rank == 0:
            append_metrics(self.run_dir / "metrics.jsonl", row)
            plot_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "curves.png", self.run_dir.name)
        elif not self.sharded:
            return  # the checkpoint is rank 0's; under FSDP every process writes its shards
        # best.pt is chosen on validation only; without a validation set there is none (the test set
        # is reported, never selected on). (The same decision on every process: the rows are reduced.)
        if self.guard.strikes:  # the loss is exploding right now: keep the last good checkpoint as it is
            log(f"epoch {epoch + 1}: the training loss is far above its start; last.pt is not overwritten")
            return
        is_best = "val_acc1" in row and validation_rank(row) > self.best_val
        if is_best:
            self.best_val = validation_rank(row)
        folder = None
        if self.sharded:  # the shards first; the .pt files that name the folder after (sharding.py)
            folder = sharded_folder(self.run_dir, "state", epoch + 1)
            save_sharded(folder, self.model, self.optimizer)
            if self.rank != 0:
                return
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
            sharded_state=folder.name if folder is not None else None,
        )
        save_training_state(self.run_dir / "last.pt", **state)
        if is_best:
            save_training_state(self.run_dir / "best.pt", **state)
            self._best_folder = state["sharded_state"]
        # the DCP folders neither checkpoint names (also after a sharded run was resumed without FSDP)
        remove_unreferenced(self.run_dir, {state["sharded_state"], self._best_folder})

    def _strategy_words(self) -> str:
        return "FSDP2, sharded" if self.sharded else "DDP" if self.world > 1 else "one process"

    def _replicas_in_sync(self) -> bool:
        prints = [None] * self.world
        dist.all_gather_object(prints, model_fingerprint(self.model))
        return len(set(prints)) == 1
