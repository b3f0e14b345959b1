"""The live progress bar of a training epoch."""

from __future__ import annotations

import sys

from .. import distributed


def log(message: str) -> None:
    if distributed.rank() == 0:
        print(message, flush=True)


class Progress:
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
