from __future__ import annotations

import pytest
import torch

from sgdph_tools.errors import UserError
from sgdph_tools.models.factory import ModelSpec, create_model
from sgdph_tools.surgery.checkpoint import load_model, read_checkpoint, save_converted
from sgdph_tools.surgery.export import export_plain
from sgdph_tools.surgery.rewrite import convert


def test_checkpoint_is_plain_data_and_keeps_tags(tmp_path):
    spec = ModelSpec("vgg11_nobn", kwargs={"num_classes": 4})
    model, report = convert(create_model(spec))
    path = save_converted(tmp_path / "m.pt", model, spec, report)
    payload = torch.load(path, weights_only=True)  # no pickled classes
    assert payload["format"] == "sgdph-tools/converted-model" and payload["version"] == 1
    assert payload["model"] == {"name": "vgg11_nobn", "source": "timm", "kwargs": {"num_classes": 4}}
    assert payload["conversion"]["layers"] == report.decoupled
    assert payload["tags"]["features.0.gamma"] == {"kind": "wn_gamma", "group": "second_order"}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_plain_checkpoints_need_their_architecture(tmp_path):
    model = create_model(ModelSpec("resnet18_cifar", kwargs={"num_classes": 3}))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(UserError, match="plain state_dict: say which architecture it is with --model"):
        load_model(str(tmp_path / "plain.pth"))
    loaded, spec, conversion = load_model(str(tmp_path / "plain.pth"), model_name="resnet18_cifar", num_classes=3)
    assert conversion is None and torch.equal(loaded.fc.weight, model.fc.weight)
    with pytest.raises(UserError, match="do not fit 'resnet18_cifar'"):
        load_model(str(tmp_path / "plain.pth"), model_name="resnet18_cifar", num_classes=7)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint file"):
        load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_each_kind_of_unreadable_file_is_named_with_what_to_do(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.warns(FutureWarning):  # torch.jit is deprecated; a user may still hand us its archive
        torch.jit.save(torch.jit.script(net), tmp_path / "script.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.pt").write_text("hello")
    expected = {
        "whole.pt": "pickled Python objects .*save model.state_dict",
        "script.pt": "TorchScript archive",
        "truncated.pt": "truncated or corrupt",
        "text.pt": "not a PyTorch checkpoint",
    }
    for name, message in expected.items():
        with pytest.raises(UserError, match=message) as info:
            read_checkpoint(tmp_path / name)
        text = str(info.value)
        assert "\n" not in text and "\x1b" not in text and "PytorchStreamReader" not in text


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UserError, match="did you mean 'vgg19_nobn'"):
        load_model("vgg19_nbn")
    with pytest.raises(UserError, match="unknown torchvision model 'resnet5'.*'resnet50'"):
        load_model("torchvision:resnet5")


def test_export_refuses_what_the_plain_architecture_cannot_hold():
    spec = ModelSpec("vit_tiny_patch16_224", kwargs={"num_classes": 3, "img_size": 32, "depth": 1, "qkv_bias": False})
    model, _ = convert(create_model(spec), add_bias=True)  # the option that adds what the original lacks
    state_dict, _ = export_plain(model, spec)  # the new qkv biases are zero: dropped
    assert "blocks.0.attn.qkv.bias" not in state_dict
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.fill_(0.1)  # as if training had moved them
    with pytest.raises(UserError, match="cannot hold it"):
        export_plain(model, spec)

    stripped_spec = ModelSpec("resnet18_cifar", kwargs={"num_classes": 3})
    stripped, _ = convert(create_model(stripped_spec), strip_norm=True)
    with pytest.raises(UserError, match="--strip-norm has no plain equivalent"):
        export_plain(stripped, stripped_spec)


def test_a_sharded_checkpoint_loads_its_weights_from_its_dcp_folder(tmp_path):
    """``trainer.strategy: fsdp`` writes the weights with torch.distributed.checkpoint to a folder the
    ``.pt`` names (its ``state_dict`` is None); inspect and export read them from there, whole."""
    import torch.distributed.checkpoint as dcp

    spec = ModelSpec("small_cnn_nobn", kwargs={"num_classes": 4})
    model, report = convert(create_model(spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias"):  # (a bias the plain layer lacks must stay zero to export)
                p.mul_(1 + torch.rand_like(p))  # not what a fresh model holds
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "state-e1.dcp", no_dist=True)
    path = save_converted(tmp_path / "last.pt", model, spec, report)
    payload = torch.load(path, weights_only=True)
    payload.update(state_dict=None, sharded_state="state-e1.dcp")
    torch.save(payload, path)
    loaded, _, conversion = load_model(str(path))
    assert conversion["layers"] == report.decoupled
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    _, error = export_plain(loaded, spec)
    assert error < 1e-4
    (tmp_path / "state-e1.dcp").rename(tmp_path / "moved.dcp")
    with pytest.raises(UserError, match="which is missing: copy the run folder whole"):
        load_model(str(path))
