"""The surgery zoo: convert ~190 timm and torchvision architectures and check every decision.

    python benchmarks/surgery_zoo.py --jobs 2 --json zoo.json > table.md   # docs/surgery.md's table
    python benchmarks/surgery_zoo.py --only 'resnet*' --only 'torchvision:*'

One architecture per timm family (the variant with the fewest parameters, chosen once by building every
model of the family on the meta device; the list is below) and one per torchvision family. Each model
runs in its own process with a time limit, on random weights, 10 classes, nothing downloaded:

1. ``convert`` with the defaults (weight-normalise every conv/linear whose channel scale is real;
   outputs verified, the probe inside it checking the decisions where it runs);
2. the numerical check of every decision. ``convert``'s own probe measurements are in its report;
   every other layer gets a scale-free derivative test first (one backward for all: a non-zero
   derivative of the features along the layer's channel scales, relative to the layer's own
   contribution, proves the scale real even behind CaiT's two 1e-5 layer scales, where the probe's
   output change is only ~1e-12), then ``ChannelScaleProbe``. A layer left alone as "already
   normalised" whose scale is real is a *wrong decision*; a decoupled layer whose scale is invariant
   is a *redundant gamma*, unless it is real once the model's all-zero parameters get random values
   (NFNet's skipinit gains hide whole branches at initialisation): those are counted as invariant at
   initialisation only; a layer the probe cannot scale (its weight read by another op) is unprobed;
3. tag completeness: every parameter tagged, every decoupled layer's gamma tagged ``wn_gamma``, and
   the 1-D parameters whose role is unknown (``other_1d``) listed;
4. export after training: every parameter perturbed (as training would move it), exported to the
   plain architecture, loaded into a fresh one with ``strict=True``, outputs compared.

Inputs are 64 px where the model takes them (``img_size=64`` for models built for a size), else the
model's own size. Prints a markdown table and a summary; ``--json`` writes every record.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# One per timm family (name prefix), the fewest parameters in the family; then the ViT variants with
# a distinct structure, then torchvision's families.
TIMM = """
aimv2_large_patch14_224 bat_resnext26ts beit_base_patch16_224 beitv2_base_patch16_224 botnet26t_256
caformer_s18 cait_xxs24_224 coat_tiny coatnet_pico_rw_224 coatnext_nano_rw_224 convformer_s18
convit_tiny convmixer_768_32 convnext_zepto_rms convnextv2_atto cpubone_nano crossvit_tiny_240
cs3darknet_focus_s csatv2 cspdarknet53 cspnext_tiny cspresnet50 cspresnext50 darknet17 darknetaa53
davit_tiny deepseek_vit_412m deit_tiny_patch16_224 densenet121 densenetblur121d dla46x_c
dm_nfnet_f0 dpn48b eca_resnext26ts ecaresnet26t ecaresnetlight ecaresnext26t_32x4d edgenext_xx_small
efficientformer_l1 efficientformerv2_s0 efficientnet_lite0 efficientnetv2_rw_t efficientvim_m1
efficientvit_b0 ese_vovnet19b_slim_dw eva02_tiny_patch14_224 fasternet_t0 fastvit_t8 fbnetc_100
fbnetv3_b flexivit_small focalnet_tiny_srf gc_efficientnetv2_rw_t gcresnet33ts gcresnext26ts
gcvit_xxtiny gemma4_vit_167m_enc gernet_s ghostnet_050 ghostnetv3_050 gmixer_12_224 gmlp_ti16_224
halo2botnet50ts_256 halonet_h1 haloregnetz_b hardcorenas_b hgnet_tiny hgnetv2_b0 hiera_tiny_224
hieradet_small hrnet_w18_small iformer_t inception_next_atto lambda_resnet26t lamhalobotnet50ts_256
lcnet_035 lcnetv2_small legacy_senet154 legacy_seresnet18 legacy_seresnext26_32x4d legacy_xception
levit_128s lowformer_b0 mambaout_femto maxvit_pico_rw_256 maxxvit_rmlp_nano_rw_256
maxxvitv2_nano_rw_256 mixer_s16_224 mixnet_s mnasnet_small mobilenet_edgetpu_100 mobilenetv2_035
mobileone_s1 mobilevit_xxs mobilevitv2_050 mvitv2_tiny naflexvit_base_patch16_parfac_gap
nasnetalarge nest_tiny nextvit_small nf_regnet_b0 nfnet_l0 pit_ti_224 pnasnet5large poolformer_s12
poolformerv2_s12 pvt_v2_b0 qwen3_vit_88m rdnet_tiny regnetv_040 regnetx_002 regnety_002
regnetz_005 repghostnet_050 repvgg_a0 repvit_m1 res2next50 resmlp_12_224 resnest14d resnet10t
resnetaa34d resnetblur18 resnetrs50 resnetv2_18 resnext26ts rexnet_100 rexnetr_100 sam2_hiera_tiny
samvit_base_patch16_224 sebotnet33ts_256 sedarknet21 sehalonet33ts selecsls42 senet154 sequencer2d_s
seresnet18 seresnetaa50d seresnext26ts seresnextaa101d_32x8d shvit_s1 skresnet18 skresnext50_32x4d
spnasnet_100 starnet_s050 swiftformer_xs swin_tiny_patch4_window7_224 swinv2_cr_tiny_224
tf_efficientnet_lite0 tf_efficientnetv2_b0 tf_mixnet_s tf_mobilenetv3_small_075 tiny_vit_5m_224
tinynet_e tnt_s_legacy_patch16_224 tresnet_m twins_svt_small vgg11 visformer_tiny vitamin_small_224
volo_d1_224 vovnet39a wide_resnet50_2 xception41p xcit_nano_12_p8_224
vit_tiny_patch16_224 vit_relpos_small_patch16_224 vit_srelpos_small_patch16_224 vit_tiny_r_s16_p8_224
vit_medium_patch16_gap_256 vit_small_patch16_rope_224 resnet18 efficientnet_b0 mobilenetv3_small_050
""".split()
TORCHVISION = """
alexnet convnext_tiny densenet121 efficientnet_b0 efficientnet_v2_s googlenet inception_v3 maxvit_t
mnasnet0_5 mobilenet_v2 mobilenet_v3_small regnet_x_400mf regnet_y_400mf resnet18 resnext50_32x4d
shufflenet_v2_x0_5 squeezenet1_0 swin_t swin_v2_t vgg11 vgg11_bn vit_b_16 wide_resnet50_2
""".split()
ZOO = TIMM + [f"torchvision:{name}" for name in TORCHVISION]


def _build(name: str):
    """The model and an example batch: 64 px where it takes them, else its own size."""
    import torch

    from sgdph_tools.models.factory import ModelSpec, create_model
    from sgdph_tools.surgery.rewrite import example_input_for

    size_kw = "image_size" if name.startswith("torchvision:") else "img_size"
    last = None
    for kwargs, size in (({size_kw: 64}, 64), ({}, 64), ({}, None)):
        try:
            torch.manual_seed(0)
            spec = ModelSpec.parse(name, num_classes=10, **kwargs)
            model = create_model(spec).eval()
            x = example_input_for(model, size)
            with torch.no_grad():
                model(x)
            return spec, model.train(), x
        except Exception as exc:  # noqa: BLE001 -- the next, larger attempt
            last = exc
    raise RuntimeError(f"does not build or run: {type(last).__name__}: {str(last)[:160]}")


#: Relative derivative above which a layer's channel scale is certainly real (rounding gives ~1e-14).
DERIVATIVE_SHOWS_REAL = 1e-8


def scale_derivatives(probe, names: list[str]) -> dict[str, float]:
    """For each layer, ``max_c |∂L/∂s_c| / Σ |∂L/∂y ⊙ y|`` at s = 1, where s scales the layer's output
    channels and L is a random projection of what the probe compares (features, or the output for a
    classifier). Invariance under every s makes it zero; a value far above rounding proves the scale
    real. One forward and one backward in the probe's float64 train-mode copy, for all layers at once."""
    import torch

    from sgdph_tools.surgery.probe import channel_dim, tensors_in

    scales, outputs, handles = {}, {}, []
    for name in names:
        layer = probe.model.get_submodule(name)
        dim = channel_dim(layer)

        def hook(_m, _i, out, name=name, dim=dim):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or name in scales:
                return None
            s = torch.ones(out.shape[dim], dtype=out.dtype, requires_grad=True)
            shape = [1] * out.ndim
            shape[dim] = -1
            scales[name], y = s, out * s.view(shape)
            y.retain_grad()
            outputs[name] = y
            return y

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            probe.features = []
            out = probe.model(probe.x)
            compared = [t for t in probe.features if isinstance(t, torch.Tensor)] + tensors_in(out)
            gen = torch.Generator().manual_seed(2)
            loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in compared)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, s in scales.items():
        y = outputs[name]
        if s.grad is None or y.grad is None:
            continue
        total = (y.grad * y).abs().sum().item()
        result[name] = s.grad.abs().max().item() / total if total > 0 else 0.0
    return result


def measure(name: str) -> dict:
    """Everything for one model (runs in a child process)."""
    import copy

    import torch

    from sgdph_tools.models.factory import create_model
    from sgdph_tools.surgery.export import export_plain
    from sgdph_tools.surgery.probe import TOLERANCE, ChannelScaleProbe
    from sgdph_tools.surgery.rewrite import DECOUPLED, NORMALISED, NOT_CONVERTIBLE, WEIGHT_STANDARDISED, convert
    from sgdph_tools.tagging import BIAS, OTHER_1D, WN_GAMMA, tag_parameters

    torch.set_num_threads(1)
    start = time.perf_counter()
    record: dict = {"model": name}
    spec, model, x = _build(name)
    record["input"] = list(x.shape[1:])
    original = copy.deepcopy(model)
    converted, report = convert(model, example_input=x)
    counts = report.counts()
    record.update(
        layers=len(report.layers),
        decoupled=counts.get(DECOUPLED, 0),
        normalised=counts.get(NORMALISED, 0),
        weight_standardised=counts.get(WEIGHT_STANDARDISED, 0),
        not_convertible=counts.get(NOT_CONVERTIBLE, 0),
        output_error=report.max_abs_error,
    )

    # 2. every decision against the probe. Where convert did not probe (decoupled layers of a model
    # with no per-channel norm), one backward first shows most scales real: a non-zero derivative of
    # the features along a layer's channel scales rules invariance out; the rest get the probe.
    probe = None
    wrong, redundant, unprobed, probed_by_convert = [], [], [], 0
    todo = [la.name for la in report.layers if la.probe_change is None and la.action in (DECOUPLED, NORMALISED)]
    shown_real: dict[str, float] = {}
    if todo:
        probe = ChannelScaleProbe(original, x)
        shown_real = {n: d for n, d in scale_derivatives(probe, todo).items() if d > DERIVATIVE_SHOWS_REAL}
    for layer in report.layers:
        change = layer.probe_change
        if change is not None:
            probed_by_convert += 1
        elif layer.name in shown_real:
            change = float("inf")  # a real scale, shown by its derivative
        elif layer.action in (DECOUPLED, NORMALISED):
            change = probe.relative_change(layer.name)
        if layer.action not in (DECOUPLED, NORMALISED):
            continue
        if change is None:
            unprobed.append(layer.name)
        elif layer.action == NORMALISED and change >= TOLERANCE:
            wrong.append(f"{layer.name} ({change:.1e})")
        elif layer.action == DECOUPLED and change < TOLERANCE:
            redundant.append(f"{layer.name} ({change:.1e})")
    # A scale that no forward sees may still be real: a zero-initialised gain downstream (NFNet's
    # skipinit) hides it at initialisation. Such layers are counted apart: the zero parameters of a
    # copy are given random values and the derivative asked again.
    init_only = []
    if redundant:
        names = [r.split(" (")[0] for r in redundant]
        woken = copy.deepcopy(original)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in woken.parameters():
                if p.numel() and not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        real = {
            n for n, d in scale_derivatives(ChannelScaleProbe(woken, x), names).items() if d > DERIVATIVE_SHOWS_REAL
        }
        init_only = [r for r in redundant if r.split(" (")[0] in real]
        redundant = [r for r in redundant if r.split(" (")[0] not in real]
    record.update(
        invariant_at_init_only=init_only,
        probed_by_convert=probed_by_convert,
        shown_real_by_derivative=len(shown_real),
        wrong_decisions=wrong,
        redundant_gammas=redundant,
        unprobed=unprobed,
    )

    # 3. tags
    tags = tag_parameters(converted)
    names = [n for n, _ in converted.named_parameters()]
    untagged = [n for n in names if n not in tags]
    gammas = {f"{layer}.gamma" for layer in report.decoupled}
    mistagged = [n for n in gammas if n in tags and tags[n].kind != WN_GAMMA]
    mistagged += [n for n in (f"{layer}.bias" for layer in report.decoupled) if n in tags and tags[n].kind != BIAS]
    record.update(
        parameters=len(names),
        untagged=untagged,
        mistagged=mistagged,
        other_1d=[n for n, t in tags.items() if t.kind == OTHER_1D],
    )

    # 4. export after a perturbation of every parameter (as training moves them)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    try:
        state_dict, error = export_plain(converted, spec, x.shape[-1])
        plain = create_model(spec)
        plain.load_state_dict(state_dict, strict=True)
        record.update(export="strict", export_error=error)
    except Exception as exc:  # noqa: BLE001 -- a finding, not a crash
        record.update(export=f"failed: {type(exc).__name__}: {str(exc)[:160]}", export_error=None)
    record["seconds"] = time.perf_counter() - start
    return record


def _child(name: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--one", name]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "failed": f"over the {timeout:.0f} s limit", "seconds": time.perf_counter() - start}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "failed": tail[:200], "seconds": time.perf_counter() - start}
    return json.loads(lines[-1])


def _row(r: dict) -> str:
    if "failed" in r:
        return f"| {r['model']} | failed: {r['failed']} |" + " |" * 9
    n = len
    export = "strict" if r["export"] == "strict" else r["export"][:60]
    error = f"{r['export_error']:.0e}" if r.get("export_error") is not None else "-"
    init = f" (+{n(r['invariant_at_init_only'])} at init only)" if r.get("invariant_at_init_only") else ""
    return (
        f"| {r['model']} | {r['layers']} | {r['decoupled']} | {r['normalised']} | {r['weight_standardised']} | "
        f"{r['not_convertible']} | {n(r['wrong_decisions'])} | {n(r['redundant_gammas'])}{init} | {n(r['unprobed'])} | "
        f"{n(r['untagged']) + n(r['mistagged'])} / {n(r['other_1d'])} | {export} ({error}) | {r['seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="glob on model names (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="models converted at a time (one thread each)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--json", type=Path, help="write every record to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)), flush=True)
        return
    names = [z for z in ZOO if not args.only or any(fnmatch.fnmatch(z, p) for p in args.only)]
    print(
        "| model | conv/linear | decoupled | already normalised | weight-standardised | not convertible | "
        "wrong decisions | redundant gammas | unprobed | untagged or mistagged / other_1d | export | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    # --json names an earlier run's file: its finished models are kept (those that failed run again)
    done = {}
    if args.json and args.json.is_file():
        done = {r["model"]: r for r in json.loads(args.json.read_text()) if "failed" not in r}
    records = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for record in pool.map(lambda n: done.get(n) or _child(n, args.timeout), names):
            records.append(record)
            print(_row(record), flush=True)
            if args.json:
                args.json.write_text(json.dumps(records, indent=1))
    ok = [r for r in records if "failed" not in r]
    keys = ("wrong_decisions", "redundant_gammas", "invariant_at_init_only", "unprobed")
    total = {k: sum(len(r.get(k, [])) for r in ok) for k in keys}
    exported = sum(r["export"] == "strict" for r in ok)
    print(
        f"\n{len(ok)} of {len(records)} models converted; {sum(r['layers'] for r in ok)} conv/linear layers; "
        f"wrong decisions {total['wrong_decisions']}, redundant gammas {total['redundant_gammas']} "
        f"(+{total['invariant_at_init_only']} invariant at initialisation only), "
        f"unprobed {total['unprobed']}; exported strict {exported} of {len(ok)}; "
        f"median {sorted(r['seconds'] for r in ok)[len(ok) // 2] if ok else 0:.0f} s per model"
    )


if __name__ == "__main__":
    main()
