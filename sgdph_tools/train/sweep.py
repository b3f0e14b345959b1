"""``sgdph sweep``: a grid of recipe overrides × seeds, each a run of its own, resumable.

A sweep lives in one folder: ``base.yaml`` (the resolved recipe every run starts from),
``sweep.json`` (the manifest: every run's overrides, seed and outcome, in the project's JSON
envelope) and one run folder per configuration and seed, as ``sgdph train`` writes them, each with
the run's own ``log.txt``. Calling the same sweep again trains only what is missing: a finished run
is skipped, an interrupted one continues from its ``last.pt`` (``--resume``, bit-exact), a diverged
one stays diverged (recorded, not retried). A new grid or more seeds over the same base recipe add
runs to the folder.

Runs go to ``--jobs`` worker processes at once (spawned, one run each), with the CPU threads split
between them: on a shared CPU, torch's default thread count per process would oversubscribe it.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..cpu import threads_per_process
from ..errors import UserError
from ..io import remove_stale_temporaries
from ..recipe import applicable_settings, load_recipe, parse_override, recipe_from_dict, with_defaults
from ..records import read_json, write_json
from .lock import FolderLock
from .metrics import DIVERGED, read_metrics

MANIFEST, BASE = "sweep.json", "base.yaml"


# ----------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """``"0.1,0.01"`` -> ``["0.1", "0.01"]``; commas inside brackets or braces belong to a value
    (``"[0.9,0.99],[0.9,0.999]"`` is two values)."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    if depth != 0 or any(not v.strip() for v in values):
        raise UserError(f"sweep values {text!r}: unbalanced brackets or an empty value")
    return [v.strip() for v in values]


#: Keys the sweep sets for every run itself, and what to do instead of an axis on them.
SWEEP_CONTROLLED = {
    "trainer.threads": "the sweep splits the CPU threads between its runs; choose them with --jobs",
    "trainer.name": "the sweep names each run after its settings",
    "trainer.output_dir": "the sweep writes its runs into --dir",
}


def parse_axes(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["optimizer.lr=0.1,0.01", ...]`` -> ``[("optimizer.lr", [0.1, 0.01]), ...]`` (values read as YAML)."""
    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"sweep axis {spec!r} must look like section.key=v1,v2 (e.g. optimizer.lr=0.1,0.01)")
        key, raw = spec.split("=", 1)
        key = key.strip()
        if key.startswith("trainer.seed"):
            raise UserError("sweep seeds with --seeds (e.g. --seeds 0-3), not with trainer.seed=...")
        if key in SWEEP_CONTROLLED:  # the sweep sets these per run: an axis on them would be recorded, not applied
            raise UserError(f"sweep axis {key}: {SWEEP_CONTROLLED[key]}")
        if any(key == k for k, _ in axes):
            raise UserError(f"sweep axis {key} is given twice; list all its values in one argument")
        axes.append((key, [parse_override(f"{key}={v}")[1] for v in split_values(raw)]))
    return axes


def parse_seeds(text: str) -> list[int]:
    """``"0-3"`` -> ``[0, 1, 2, 3]``; ``"0,2,5-6"`` -> ``[0, 2, 5, 6]``."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"--seeds {text!r}: give seeds as 0-3, 0,1,2 or a mix (0,2,5-6)")
        start, end = int(match[1]), int(match[2] or match[1])
        if end < start:
            raise UserError(f"--seeds {text!r}: the range {part.strip()} runs backwards")
        seeds += range(start, end + 1)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} names a seed twice")
    return seeds


def _yaml_text(value: Any) -> str:
    """``value`` as one line of YAML, as an override writes it (``0.0005``, ``[0.9, 0.99]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", _yaml_text(value)).strip("_") or "none"


def config_name(config: dict[str, Any]) -> str:
    """A folder name for one configuration: each swept key's last part and its value
    (``lr0.1-weight_decay0.0005``), whole keys where last parts collide."""
    if not config:
        return "base"
    last = [k.rsplit(".", 1)[-1] for k in config]
    names = [k.replace(".", "_") if last.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1] for k in config]
    return "-".join(f"{n}{_slug(v)}" for n, v in zip(names, config.values()))


@dataclass
class PlannedRun:
    name: str  # the run folder's name: <config>-s<seed>
    config: dict[str, Any]  # the swept keys and their values
    seed: int
    status: str = "pending"  # pending, done, diverged, failed
    message: str = ""
    final: dict[str, Any] = field(default_factory=dict)  # the last metrics row, when done

    def overrides(self, folder: Path) -> list[str]:
        swept = [f"{k}={_yaml_text(v)}" for k, v in self.config.items()]
        return [
            *swept,
            f"trainer.seed={self.seed}",
            f"trainer.name={self.name}",
            f"trainer.output_dir={folder}",
            "trainer.progress=false",
        ]


def plan(axes: list[tuple[str, list[Any]]], seeds: list[int]) -> list[PlannedRun]:
    keys = [k for k, _ in axes]
    runs = []
    for values in itertools.product(*(v for _, v in axes)):
        config = dict(zip(keys, values))
        for seed in seeds:
            runs.append(PlannedRun(f"{config_name(config)}-s{seed}", config, seed))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("two configurations of the grid get the same folder name; give distinct values")
    return runs


# ----------------------------------------------------------------------------- the folder


class Sweep:
    """A sweep folder: its base recipe, its manifest, and the state of each run."""

    def __init__(self, folder: Path, base_recipe: Path, runs: list[PlannedRun]):
        self.folder, self.base = folder, folder / BASE
        remove_stale_temporaries(folder)  # a manifest write cut short by a kill
        base = load_recipe(base_recipe)
        base.trainer.name = None  # every run names itself; the base is compared without a name
        base_text = base.to_yaml()
        recorded = with_defaults(yaml.safe_load(self.base.read_text())) if self.base.exists() else None
        if recorded is not None and applicable_settings(recorded) != applicable_settings(base.as_dict()):
            raise UserError(
                f"{folder} holds a sweep of another base recipe ({self.base}); give another --dir, or the same recipe"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.base.exists():
            self.base.write_text(base_text)
        known = self._load_manifest()
        self.runs = list(known.values()) + [r for r in runs if r.name not in known]
        self.requested = {r.name for r in runs}
        for run in runs:  # the same name must mean the same configuration
            if run.name in known and known[run.name].config != run.config:
                raise UserError(f"{folder}: the run {run.name} exists with another configuration")
        # Every run's recipe is valid before anything trains; its epochs say when it is finished.
        self._epochs = {
            run.name: recipe_from_dict(base.as_dict(), run.overrides(self.folder)).trainer.epochs for run in self.runs
        }
        for run in self.runs:
            self._refresh(run)

    def _load_manifest(self) -> dict[str, PlannedRun]:
        path = self.folder / MANIFEST
        if not path.exists():
            return {}
        return {r["name"]: PlannedRun(**r) for r in read_json(path, "sweep")["records"]}

    def save(self) -> None:
        write_json(self.folder / MANIFEST, "sweep", [asdict(r) for r in self.runs], base=BASE)

    def _refresh(self, run: PlannedRun) -> None:
        """A run's status from its folder: finished when its metrics reach the recipe's epochs. A
        diverged run stays diverged (it would diverge again); a failed one is tried again."""
        if run.status == "diverged":
            return
        marker = self.folder / run.name / DIVERGED  # the trainer's own record, should the manifest have missed it
        if marker.is_file():
            run.status, run.message = "diverged", marker.read_text().strip()
            return
        rows = read_metrics(self.folder / run.name / "metrics.jsonl")
        if rows and rows[-1]["epoch"] >= self._epochs[run.name] and (self.folder / run.name / "last.pt").exists():
            run.status, run.final = "done", rows[-1]
        else:
            run.status = "pending"

    def todo(self) -> list[PlannedRun]:
        """The requested runs still to train (statuses as the folder showed them when opened)."""
        return [r for r in self.runs if r.name in self.requested and r.status == "pending"]


# ----------------------------------------------------------------------------- running


def _train_one(base: str, overrides: list[str], threads: int) -> dict[str, Any]:
    """In a worker process: train (or resume) one run; its output goes to the run's log.txt."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from . import Trainer
    from .loop import Diverged

    recipe = load_recipe(base, [*overrides, f"trainer.threads={threads}"])
    run_dir = Path(recipe.trainer.output_dir) / recipe.trainer.name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rows = Trainer(recipe, resume=(run_dir / "last.pt").exists()).run()
        except Diverged as exc:
            return {"status": "diverged", "message": str(exc)}
        except UserError as exc:
            return {"status": "failed", "message": str(exc)}
    return {"status": "done", "final": rows[-1] if rows else {}}


def threads_per_job(jobs: int, cpus: int | None = None) -> int:
    """The CPU threads each of ``jobs`` parallel runs gets: the CPUs this process may use (affinity
    and cgroup quota) split evenly, at least one."""
    return threads_per_process(jobs, cpus)


def run_sweep(sweep: Sweep, jobs: int, on_event: Callable[[str, PlannedRun], None] = lambda e, r: None) -> None:
    """Train every pending requested run, ``jobs`` at a time; the manifest is saved after each."""
    lock = FolderLock(sweep.folder, "sgdph sweep", "wait for it (one sweep per folder), or give another --dir")
    lock.acquire()
    try:
        _run_locked(sweep, jobs, on_event)
    finally:
        lock.release()


def _run_locked(sweep: Sweep, jobs: int, on_event: Callable[[str, PlannedRun], None]) -> None:
    todo = sweep.todo()
    sweep.save()
    if not todo:
        return
    threads = threads_per_job(jobs)
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(jobs, len(todo)), maxtasksperchild=1) as pool:
        pending = {
            run.name: (run, pool.apply_async(_train_one, (str(sweep.base), run.overrides(sweep.folder), threads)))
            for run in todo
        }
        for run, _ in pending.values():
            on_event("queued", run)
        while pending:
            for name, (run, result) in list(pending.items()):
                if not result.ready():
                    continue
                del pending[name]
                try:
                    outcome = result.get()
                except Exception as exc:  # a crash in the worker: recorded, the sweep goes on
                    outcome = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
                run.status, run.message = outcome["status"], outcome.get("message", "")
                run.final = outcome.get("final", {})
                sweep.save()
                on_event(run.status, run)
            if pending:
                next(iter(pending.values()))[1].wait(timeout=0.5)
