"""Continuing a run: what may change between a run and its resumption, and the restore itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..recipe import with_defaults
from .metrics import append_metrics, truncate_metrics
from .progress import log
from .sharding import load_sharded
from .state import load_training_state, set_rng_state

# Keys that may differ between a run and its resumption: freely (they change nothing computed) ...
# (the location is not the run: a renamed or moved run folder, or a moved sweep, resumes)
RESUME_FREE = {
    ("trainer", "progress"),
    ("trainer", "log_every"),
    ("trainer", "threads"),
    ("data", "num_workers"),
    ("trainer", "output_dir"),
    ("trainer", "name"),
}
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
    "trainer.strategy",  # fsdp -> ddp (the shards load whole); a ddp checkpoint does not load sharded
)


def restore_run(self: Any, allow_changes: bool) -> None:
    """Load the run's last.pt into a freshly built :class:`~.trainer.Trainer` (``self``), after
    checking that the recipe and the process count are the run's (or only differ where
    ``--allow-changes`` lets them)."""
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
    if state.get("sharded_state"):  # FSDP's shards, resharded to how this run holds them (sharding.py)
        folder = self.run_dir / state["sharded_state"]
        if not folder.is_dir():
            raise UserError(f"{path} names the sharded state {folder}, which is missing: copy the run folder whole")
        load_sharded(folder, self.model, self.optimizer)
    elif self.sharded:
        raise UserError(f"{path} was written without FSDP (trainer.strategy=ddp): resume it with trainer.strategy=ddp")
    else:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
    self.scheduler.load_state_dict(state["scheduler"])
    if self.scaler is not None and state["scaler"] is not None:
        self.scaler.load_state_dict(state["scaler"])
    best = self.run_dir / "best.pt"  # the DCP folder it names is kept until a new best replaces it
    self._best_folder = load_training_state(best).get("sharded_state") if best.is_file() else None
    set_rng_state(state["rng"], self.device)
    self.start_epoch, self.best_val = state["epoch"], (state["best_val_acc1"], -state["best_val_loss"])
    self.guard.reference = state.get("loss_reference")
    if self.rank == 0:  # (also drops a line torn by a kill during its write)
        truncate_metrics(self.run_dir / "metrics.jsonl", self.start_epoch)
    if changed:
        _apply_changes(self, saved, changed, self.start_epoch, saved_world)
    log(f"resumed {self.run_dir} after epoch {self.start_epoch}")


def _apply_changes(self: Any, saved: dict, changed: list[str], epoch: int, saved_world: int) -> None:
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
    log(f"resuming with changes: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}")


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
        elif a != b and path not in RESUME_FREE:
            changed.append(".".join(path))
    return changed


#: What a run writes besides last.pt: without last.pt to resume from, these are an earlier run's.
EARLIER_FILES = ("metrics.jsonl", "best.pt", "curves.png", "recipe.yaml", "diverged.txt")


def set_aside_earlier_files(run_dir: Path) -> Path | None:
    """A new run in a folder whose ``last.pt`` is gone but whose other files remain: they belong to an
    earlier run (appending to its history would credit its best epoch to the new run), so they move
    to ``run_dir/earlier-<time>/``, and a line says so. Returns that folder (None: nothing to move)."""
    found = [run_dir / name for name in EARLIER_FILES if (run_dir / name).exists()]
    history = any(p.name in ("metrics.jsonl", "best.pt") for p in found)  # a recipe.yaml alone: a run cut in epoch 1
    if not history or (run_dir / "last.pt").exists():
        return None
    aside = run_dir / time.strftime("earlier-%Y%m%d-%H%M%S")
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    log(f"{run_dir} held an earlier run's {', '.join(p.name for p in found)} without last.pt: moved them to {aside}")
    return aside
