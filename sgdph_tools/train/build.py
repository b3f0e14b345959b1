"""Building what a recipe names: the process group, the model (by name, for the data's classes and
channels, converted when asked), and the checks ``--dry-run`` adds to the recipe's validation."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.datasets import build_datasets, check_batch_fits
from ..errors import UserError
from ..models.factory import TORCHVISION_PREFIXES, ModelSpec, create_model_for_size
from ..recipe import Recipe
from ..surgery.rewrite import convert, example_input_for
from .optimizers import build_optimizer


def init_distributed(always: bool = False) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, created) from torchrun's environment; initialises the process
    group (NCCL on GPUs, gloo on CPUs) when there is more than one process and none exists yet --
    or, with ``always`` (FSDP2 shards over a process group), a group of this one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if (world > 1 or always) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # one process started without torchrun
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_unused_port()}", rank=0, world_size=1)
        return rank, world, local_rank, True
    return rank, world, local_rank, False


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_spec(recipe: Recipe, num_classes: int, in_chans: int) -> ModelSpec:
    """The recipe's model for the data's classes and channels. timm models take the data's channels
    (a model's own default may differ: small_cnn's is 1); torchvision's constructors have no
    in_chans and are 3-channel."""
    given = recipe.model.kwargs.get("num_classes")
    if given is not None and given != num_classes:
        raise UserError(
            f"model.kwargs.num_classes={given} disagrees with the data ({recipe.data.name} has {num_classes} "
            "classes): remove model.kwargs.num_classes (the data sets it)"
        )
    kwargs = {"num_classes": num_classes, **recipe.model.kwargs}
    if not recipe.model.name.startswith(TORCHVISION_PREFIXES) or in_chans != 3:
        kwargs = {"in_chans": in_chans, **kwargs}
    return ModelSpec.parse(recipe.model.name, **kwargs)


def training_device(recipe: Recipe, local_rank: int = 0) -> torch.device:
    """The device ``trainer.device`` names (auto: CUDA when present); the one-line errors when it
    cannot be used."""
    t = recipe.trainer
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.precision == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
        raise UserError("trainer.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def convert_for_recipe(model: nn.Module, recipe: Recipe, img_size: int):
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
    (conversion traces it with real tensors). The datasets are opened as training opens them (files
    listed, not loaded: empty class folders, a batch larger than the training set). Raises the same
    one-line errors training would."""
    training_device(recipe)
    data = build_datasets(recipe.data)
    check_batch_fits(recipe.trainer.batch_size, len(data.train))
    num_classes, in_chans, img_size = data.num_classes, data.in_chans, data.img_size
    spec = model_spec(recipe, num_classes, in_chans)
    conv = recipe.model.conversion
    converts = conv.wn or conv.strip_norm
    with torch.device("cpu" if converts else "meta"):
        try:
            model = create_model_for_size(spec, img_size)
        except UserError:
            raise
        except (ValueError, RuntimeError, AssertionError) as exc:  # a value the architecture rejects
            raise UserError(f"cannot build '{spec.display_name}' with {recipe.model.kwargs}: {exc}") from exc
    if converts:
        model, _ = convert_for_recipe(model, recipe, img_size)
    try:
        build_optimizer(recipe.optimizer, model)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:  # e.g. an optimizer.kwargs entry the optimizer does not take
        raise UserError(f"optimizer '{recipe.optimizer.name}': {exc}") from exc
