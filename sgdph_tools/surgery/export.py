"""Export: bake weight-normalised layers into plain ones and check the result against the plain
architecture, built fresh by name — the model a user will load the state_dict into."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import checks
from ..errors import UserError
from ..models.factory import ModelSpec, create_model
from .rewrite import bake_model, eval_output, example_input_for, verify_outputs


def export_plain(
    model: nn.Module, spec: ModelSpec, img_size: int | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """A state_dict of ``spec``'s plain architecture that computes what ``model`` computes.

    A decoupled layer always has a bias; where the original layer had none, the bias is dropped if
    it is still zero, and is an error otherwise (the plain architecture cannot hold it). A model whose
    norm layers were stripped has no plain equivalent (its norms are gone): also an error.
    Returns ``(state_dict, max_abs_error)``; the error is measured on the fresh plain model.
    """
    checks.module("model", model)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec (ModelSpec.parse(name, **kwargs)), got {type(spec).__name__}")
    img_size = img_size or spec.kwargs.get("img_size") or spec.kwargs.get("image_size")
    x = example_input_for(model, img_size)
    expected = eval_output(model, x)
    state_dict = bake_model(copy.deepcopy(model)).state_dict()
    plain = create_model(spec)
    plain_keys = set(plain.state_dict())

    missing = sorted(plain_keys - set(state_dict))
    if missing:
        raise UserError(
            f"'{spec.display_name}' has weights this model lacks ({', '.join(missing[:3])}, ...): a model converted "
            "with --strip-norm has no plain equivalent; use its converted checkpoint instead"
        )
    extra = sorted(set(state_dict) - plain_keys)
    trained = [k for k in extra if not (k.endswith(".bias") and torch.count_nonzero(state_dict[k]) == 0)]
    if trained:
        raise UserError(
            f"layers {', '.join(k.rsplit('.', 1)[0] for k in trained[:3])} have no bias in '{spec.display_name}', but "
            "their decoupled bias was trained to non-zero values: the plain architecture cannot hold it; "
            "use the converted checkpoint instead"
        )
    for key in extra:  # zero biases of layers that had none
        del state_dict[key]
    plain.load_state_dict(state_dict, strict=True)
    return state_dict, verify_outputs(expected, eval_output(plain, x))
