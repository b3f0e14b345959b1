"""convert() over a zoo of real timm and torchvision architectures: verified outputs, a complete
report, checkpoint and bake round trips."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from sgdph_tools import module_kinds
from sgdph_tools.models.factory import ModelSpec, create_model
from sgdph_tools.surgery.checkpoint import load_model, save_converted
from sgdph_tools.surgery.export import export_plain
from sgdph_tools.surgery.rewrite import (
    DECOUPLED,
    EXCLUDED,
    KEPT,
    NORMALISED,
    NOT_CONVERTIBLE,
    WEIGHT_STANDARDISED,
    VerificationError,
    convert,
    example_input_for,
)
from sgdph_tools.tagging import WN_GAMMA, tag_parameters

ZOO = [
    # name, kwargs, input size, expected actions: a representative dozen (benchmarks/surgery_zoo.py runs the rest)
    ("resnet18", {}, 32, {NORMALISED: 20, DECOUPLED: 1}),  # BN everywhere but the head
    ("efficientnet_b0", {}, 32, {NORMALISED: 49, DECOUPLED: 33}),  # depthwise convs, SE convs
    ("mobilenetv3_small_050", {}, 32, {NORMALISED: 34, DECOUPLED: 20}),
    # LayerNorm over channels removes only a common scale: the layers feeding it keep a real one
    ("convnext_atto", {}, 32, {DECOUPLED: 41}),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32, {DECOUPLED: 10}),  # pre-norm blocks
    ("nf_resnet26", {}, 32, {WEIGHT_STANDARDISED: 29, DECOUPLED: 1}),  # ScaledStdConv2d in leaf blocks
    ("levit_128s", {"img_size": 64}, 64, {NORMALISED: 50, DECOUPLED: 2}),  # bn(x.flatten(0, 1)).reshape_as(x)
    ("mobilevit_xxs", {}, 64, {NORMALISED: 32, DECOUPLED: 40}),  # blocks that do not trace; LayerNorms
    ("eva02_tiny_patch14_224", {"img_size": 28}, 28, {DECOUPLED: 50}),  # F.linear on qkv.weight
    ("vgg19_nobn", {}, 32, {DECOUPLED: 17}),
    ("torchvision:vit_b_16", {"image_size": 32}, 32, {DECOUPLED: 37, NOT_CONVERTIBLE: 1}),  # MHA; zero-init head
    ("torchvision:swin_t", {}, 32, {DECOUPLED: 53}),  # the patch embedding feeds a LayerNorm
]


def conv_linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if module_kinds.is_conv_or_linear(m)}


@pytest.mark.parametrize("name,kwargs,size,expected", ZOO, ids=[z[0] for z in ZOO])
def test_zoo(name, kwargs, size, expected, tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec.parse(name, num_classes=5, **kwargs)
    model = create_model(spec)
    original_type, layers = type(model), conv_linear_names(model)
    x = example_input_for(model, size)

    model, report = convert(model, example_input=x)  # verified: raises on any output change

    assert type(model) is original_type  # the eager model, not a GraphModule
    assert {layer.name for layer in report.layers} == layers  # every conv/linear decided
    assert report.counts() == expected
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    tags = tag_parameters(model)
    gains = sum(t.kind == WN_GAMMA and t.module_type.startswith("ScaledStd") for t in tags.values())
    assert sum(t.kind == WN_GAMMA for t in tags.values()) - gains == expected[DECOUPLED]

    # Checkpoint round trip: rebuilt by name, conversion re-applied, same outputs.
    path = save_converted(tmp_path / "model.pt", model, spec, report)
    loaded, loaded_spec, conversion = load_model(str(path))
    assert loaded_spec == spec and conversion["layers"] == report.decoupled
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    # Bake round trip: a plain state_dict that the fresh architecture loads strictly.
    if NOT_CONVERTIBLE not in expected:
        state_dict, error = export_plain(model, spec, size)
        plain = create_model(spec).eval()
        plain.load_state_dict(state_dict, strict=True)
        assert error < 1e-4
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_timm_methods_survive():
    model = create_model(ModelSpec("resnet18", kwargs={"num_classes": 5}))
    model, _ = convert(model, example_input=torch.randn(1, 3, 32, 32))
    model.eval()
    assert model.pretrained_cfg["architecture"] == "resnet18"
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_exclude_wn_false_and_strip_norm():
    spec = ModelSpec("resnet18_cifar", kwargs={"num_classes": 5})
    _, report = convert(create_model(spec), exclude=["fc"])
    assert report.counts() == {NORMALISED: 20, EXCLUDED: 1}
    _, report = convert(create_model(spec), wn=False)
    assert report.counts() == {NORMALISED: 20, KEPT: 1} and report.decoupled == []
    model, report = convert(create_model(spec), strip_norm=True)
    assert len(report.stripped_norms) == 20 and report.counts() == {DECOUPLED: 21}
    assert not any(module_kinds.is_norm(m) for m in model.modules())


def test_strip_norm_keeps_the_activation_of_fused_norm_layers():
    model = create_model(ModelSpec("efficientnet_b0", kwargs={"num_classes": 5}))  # BatchNormAct2d
    model, report = convert(model, strip_norm=True, example_input=torch.randn(1, 3, 32, 32))
    stripped = model.get_submodule(report.stripped_norms[0])
    assert isinstance(stripped, nn.Sequential) and any(isinstance(m, nn.SiLU) for m in stripped.modules())


def test_a_conversion_that_changes_outputs_is_an_error(monkeypatch):
    from sgdph_tools.surgery import rewrite as convert_py

    real = convert_py.to_weight_norm

    def wrong(module, add_bias=False):
        layer = real(module, add_bias)
        with torch.no_grad():
            layer.gamma.mul_(1.01)  # a 1% error in one layer
        return layer

    monkeypatch.setattr(convert_py, "to_weight_norm", wrong)
    with pytest.raises(VerificationError, match="differ from the original"):
        convert(create_model(ModelSpec("vgg11_nobn", kwargs={"num_classes": 5})))


def test_saved_conversion_naming_a_missing_layer_is_an_error():
    with pytest.raises(Exception, match="does not have"):
        convert(create_model(ModelSpec("resnet18_cifar")), layers=["no.such.layer"], verify=False)


@pytest.mark.parametrize(
    "name,kwargs", [("resnet18", {}), ("small_cnn_nobn", {}), ("vit_tiny_patch16_224", {"img_size": 32})]
)
def test_the_example_input_has_the_channels_the_model_was_built_for(name, kwargs):
    model = timm.create_model(name, in_chans=1, num_classes=3, **kwargs)
    assert example_input_for(model, 32).shape == (2, 1, 32, 32)  # timm's config still says 3 channels
    converted, report = convert(model, wn=True)  # the verification forward runs on that input
    assert report.decoupled and converted(torch.randn(2, 1, 32, 32)).shape == (2, 3)


class TiedLM(nn.Module):
    """A language model whose output head is tied to its embedding (``head.weight = embed.weight``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


class SharedBlock(nn.Module):
    """One linear registered under two names (``self.b = self.a``) and applied twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_parameters_are_left_alone_with_the_reason_and_stay_tied_through_training():
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 11, (4, 5))
    converted, report = convert(model, example_input=tokens)
    head = next(layer for layer in report.layers if layer.name == "head")
    assert head.action == NOT_CONVERTIBLE and "weight is embed.weight" in head.detail
    assert next(layer for layer in report.layers if layer.name == "body").action == DECOUPLED
    opt = torch.optim.SGD(converted.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        converted(tokens).logsumexp(-1).mean().backward()
        opt.step()
    assert converted.head.weight is converted.embed.weight  # still one tensor after training


def test_a_module_under_two_names_is_converted_once_and_stays_shared(tmp_path):
    torch.manual_seed(0)
    model = SharedBlock()
    converted, report = convert(model, example_input=torch.randn(2, 4))
    assert converted.a is converted.b and module_kinds.is_weight_norm(converted.a)
    shared = next(layer for layer in report.layers if layer.name == "a")
    assert shared.action == DECOUPLED and "also registered as b" in shared.detail
    assert [layer.name for layer in report.layers].count("b") == 0  # one decision for one module
    from sgdph_tools.surgery.rewrite import bake_model

    baked = bake_model(converted)
    assert baked.a is baked.b and isinstance(baked.a, nn.Linear)


def test_a_model_converted_with_the_defaults_exports_after_training_even_where_layers_had_no_bias():
    spec = ModelSpec.parse("vit_tiny_patch16_224", num_classes=3, img_size=32, qkv_bias=False)
    converted, report = convert(create_model(spec))
    assert not report.add_bias and converted.blocks[0].attn.qkv.bias is None  # nothing the original cannot hold
    with torch.no_grad():  # training moves every parameter
        for p in converted.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state_dict, error = export_plain(converted, spec)
    plain = create_model(spec)
    plain.load_state_dict(state_dict, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), converted.eval()(x), rtol=1e-4, atol=1e-4)
    assert error < 1e-4
