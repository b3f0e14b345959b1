"""The converted-model checkpoint: rebuildable from its description, no pickled classes.

A file holds the model's name, source and kwargs, the conversion options (with the exact list of
decoupled layers), the state_dict and the parameter tags. Loading rebuilds the model by name,
re-applies the conversion to exactly those layers and loads the weights, so it survives code
changes and loads with ``torch.load(weights_only=True)``.

``load_model`` also accepts a model name and a plain state_dict (a timm checkpoint) with a name.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from ..io import atomic_save
from ..models.factory import ModelSpec, create_model, create_model_for_size
from ..tagging import tag_parameters
from ..version import __version__
from .rewrite import ConversionReport, convert

FORMAT = "sgdph-tools/converted-model"
TRAIN_FORMAT = "sgdph-tools/train-checkpoint"  # written by sgdph train: a superset of this format
VERSION = 1
# The training checkpoint's own version (its model part is this format's version 1). 2: best.pt is
# chosen on validation (``best_val_acc1``); 1 chose on test (``best_acc1``).
TRAIN_VERSION = 2


def save_converted(path: str | os.PathLike, model: nn.Module, spec: ModelSpec, report: ConversionReport) -> Path:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "sgdph_tools_version": __version__,
        "model": spec.as_dict(),
        "conversion": {
            "wn": report.wn,
            "strip_norm": report.strip_norm,
            "exclude": list(report.exclude),
            "layers": report.decoupled,
            "add_bias": report.add_bias,
        },
        "state_dict": model.state_dict(),
        "tags": {name: {"kind": t.kind, "group": t.group} for name, t in tag_parameters(model).items()},
    }
    return atomic_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with a one-line error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- corrupt file, not a torch file, pickled classes...
        raise UserError(f"cannot read checkpoint {path}: {unreadable_reason(path, exc)}") from exc


def unreadable_reason(path: Path, exc: Exception) -> str:
    """What a file that ``torch.load`` refused is, and what to do: one sentence, no terminal codes."""
    text = str(exc)
    head = path.read_bytes()[:4] if path.is_file() else b""
    if "TorchScript" in text:
        return (
            "it is a TorchScript archive, not a checkpoint; load it with torch.jit.load and save "
            "model.state_dict() with torch.save, then pass that file"
        )
    if "Weights only load failed" in text or "weights_only" in text:
        return (
            "it holds pickled Python objects (a whole model saved with torch.save(model)), which are not "
            "loaded for safety; save model.state_dict() instead"
        )
    if (
        head[:2] == b"PK"
        or "central directory" in text
        or "unexpected EOF" in text.lower()
        or isinstance(exc, EOFError)
    ):
        return "it is truncated or corrupt (an interrupted copy or write?); copy it again, or use another checkpoint"
    return "it is not a PyTorch checkpoint (torch.save file); give a file written by torch.save or sgdph"


def is_converted(payload: Any) -> bool:
    """A checkpoint that describes its model: converted (sgdph convert) or trained (sgdph train)."""
    return isinstance(payload, dict) and payload.get("format") in (FORMAT, TRAIN_FORMAT)


def rebuild_converted(payload: dict[str, Any], path: Path | None = None) -> tuple[nn.Module, ModelSpec, dict | None]:
    """Rebuild the model a checkpoint describes and load its weights. ``conversion`` is None for a
    trained model that was not converted. A checkpoint of a sharded run (``trainer.strategy: fsdp``)
    names a ``torch.distributed.checkpoint`` folder beside ``path`` that holds the weights."""
    if payload.get("version", 0) > (TRAIN_VERSION if payload.get("format") == TRAIN_FORMAT else VERSION):
        raise UserError(f"checkpoint format version {payload['version']} is newer than this sgdph-tools understands")
    spec = ModelSpec(**payload["model"])
    conversion = payload.get("conversion")
    model = create_model(spec)
    if conversion is not None:
        model, _ = convert(
            model,
            wn=conversion["wn"],
            strip_norm=conversion["strip_norm"],
            exclude=conversion["exclude"],
            layers=conversion["layers"],
            verify=False,
            # checkpoints written before the option existed gave every decoupled layer a bias
            add_bias=conversion.get("add_bias", True),
        )
    if payload.get("sharded_state"):
        _load_sharded_weights(model, payload["sharded_state"], path)
    else:
        _load_state_dict(model, payload["state_dict"], spec.display_name)
    return model, spec, conversion


def _load_sharded_weights(model: nn.Module, name: str, path: Path | None) -> None:
    """The model's weights from the DCP folder ``name`` beside ``path``, gathered whole (one process)."""
    import torch.distributed.checkpoint as dcp  # only sharded checkpoints need it

    folder = (path.parent if path is not None else Path(".")) / name
    if not folder.is_dir():
        raise UserError(f"the checkpoint's weights are in {folder}, which is missing: copy the run folder whole")
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # that one process reads it is the point, not news
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=folder, no_dist=True)
    except Exception as exc:  # DCP raises its own CheckpointException types
        raise UserError(f"cannot read the sharded weights in {folder}: {str(exc).splitlines()[0][:200]}") from None
    model.load_state_dict(state)


def _load_state_dict(model: nn.Module, state_dict: dict, what: str) -> None:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise UserError(f"the weights do not fit '{what}': {mismatch[:220]} (wrong --num-classes?)") from exc
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"the weights do not fit '{what}': missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]} (wrong --model or --num-classes?)"
        )


def plain_state_dict(payload: Any) -> dict | None:
    """The state_dict inside a plain checkpoint: the dict itself, or under 'state_dict'/'model'."""
    if not isinstance(payload, dict):
        return None
    for key in ("state_dict", "model", "state_dict_ema"):
        inner = payload.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    return None


def load_model(
    source: str,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs,
) -> tuple[nn.Module, ModelSpec, dict | None]:
    """A model from a converted checkpoint, a plain checkpoint (needs ``model_name``), or a name.

    ``img_size`` is passed to architectures that fix their input size (ViTs). Returns
    ``(model, spec, conversion)``; ``conversion`` is None unless the source was converted.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a checkpoint path or a model name, got {type(source).__name__}")
    source = os.fspath(source)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    path = Path(source)
    looks_like_file = path.suffix in (".pt", ".pth", ".bin", ".ckpt") or os.sep in source
    if not path.is_file() and not looks_like_file:
        spec = ModelSpec.parse(source, **kwargs)
        return create_model_for_size(spec, img_size), spec, None
    payload = read_checkpoint(path)
    if is_converted(payload):
        return rebuild_converted(payload, path)
    state_dict = plain_state_dict(payload)
    if state_dict is None:
        raise UserError(f"{path} holds no state_dict: expected a converted checkpoint or a state_dict")
    if model_name is None:
        raise UserError(f"{path} is a plain state_dict: say which architecture it is with --model NAME")
    spec = ModelSpec.parse(model_name, **kwargs)
    model = create_model_for_size(spec, img_size)
    _load_state_dict(model, state_dict, spec.display_name)
    return model, spec, None
