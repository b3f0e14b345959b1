"""sgdph convert / inspect / export."""

from __future__ import annotations

import json

import timm
import torch

from sgdph_tools.errors import UserError
from sgdph_tools.surgery.checkpoint import load_model
from tests.cli.helpers import invoke, user_error


def test_convert_writes_the_default_file_and_prints_a_summary(tmp_path):
    result = invoke("convert", "vgg11_nobn", "--wn", "--num-classes", "10", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vgg11_nobn_wn.pt").is_file()
    out = result.output
    assert "9 conv/linear layers: 9 decoupled" in out
    assert "decoupled: 9   already normalised: 0   excluded: 0" in out
    assert "second_order" in out and "first_order" in out
    assert "verification: max |output difference| = 0" in out
    model, spec, conversion = load_model(str(tmp_path / "vgg11_nobn_wn.pt"))
    assert spec.kwargs == {"num_classes": 10} and len(conversion["layers"]) == 9


def test_convert_options(tmp_path):
    out = tmp_path / "r.pt"
    result = invoke(
        "convert", "resnet18_cifar", "--strip-norm", "-x", "fc", "--num-classes", "5", "-o", str(out), "--layers"
    )
    assert result.exit_code == 0, result.output
    assert "20 decoupled, 1 excluded" in result.output and "norm layers replaced by identities: 20" in result.output
    assert "matches --exclude" in result.output  # the per-layer table
    _, _, conversion = load_model(str(out))
    assert conversion["strip_norm"] and conversion["exclude"] == ["fc"] and "fc" not in conversion["layers"]


def test_inspect_a_model_name_is_a_dry_run(tmp_path):
    result = invoke("inspect", "resnet18_cifar", "--num-classes", "10", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert "bn1.weight" in result.output and "norm_weight" in result.output
    assert "21 conv/linear layers: 20 already normalised, 1 decoupled" in result.output


def test_inspect_json(tmp_path):
    result = invoke("inspect", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    assert data["model"]["kwargs"] == {"num_classes": 10, "img_size": 32}
    assert data["format"] == "sgdph-tools/inspect"
    params = {p["name"]: p for p in data["records"]}
    assert params["blocks.0.attn.qkv.gamma"]["kind"] == "wn_gamma" and params["head.bias"]["group"] == "first_order"
    assert data["totals"]["all"]["numel"] == sum(p["numel"] for p in data["records"])
    assert data["totals"]["all"]["numel"] > sum(p.numel() for p in model.parameters())  # gammas (and biases) added
    assert len(data["layers"]) == 50 and data["layers"][0]["action"] == "decoupled"


def test_inspect_a_converted_checkpoint_and_export_it(tmp_path):
    ckpt = tmp_path / "m.pt"
    assert invoke("convert", "vgg11_nobn", "--num-classes", "4", "-o", str(ckpt)).exit_code == 0
    result = invoke("inspect", str(ckpt), "--json")
    data = json.loads(result.output)
    assert data["conversion"]["wn"] and len(data["conversion"]["layers"]) == 9

    plain = tmp_path / "plain.pt"
    result = invoke("export", str(ckpt), "-o", str(plain))
    assert result.exit_code == 0, result.output
    assert "baked 9 layers" in result.output
    model = timm.create_model("vgg11_nobn", num_classes=4)
    model.load_state_dict(torch.load(plain, weights_only=True), strict=True)
    converted, _, _ = load_model(str(ckpt))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), converted.eval()(x), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_one_line_errors(tmp_path):
    assert user_error("convert", "vgg19_nbn").startswith("unknown model 'vgg19_nbn'; did you mean 'vgg19_nobn'")
    (tmp_path / "junk.pt").write_text("garbage")
    assert user_error("inspect", str(tmp_path / "junk.pt")).startswith("cannot read checkpoint")
    assert "no such checkpoint file" in user_error("export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt"))


def test_convert_no_wn_alone_is_refused_and_export_names_the_right_loader(tmp_path):
    result = invoke("convert", "small_cnn_nobn", "--no-wn")
    assert isinstance(result.exception, UserError) and "--no-wn without --strip-norm" in str(result.exception)
    out = tmp_path / "r.pt"
    assert (
        invoke("convert", "torchvision:resnet18", "--num-classes", "3", "--img-size", "32", "-o", str(out)).exit_code
        == 0
    )
    result = invoke("export", str(out), "-o", str(tmp_path / "plain.pt"), "--img-size", "32")
    assert result.exit_code == 0, result.output
    assert "torchvision.models.get_model('resnet18'" in result.output and "timm.create_model" not in result.output
