"""Tests for contrastive.embedders: Embedder (timm / MLP / nn.Module backbones, heads, weights,
config round trip, data config) and embed() (equality with a manual eval-mode loop, mode and
memory-format restoration, dtypes, input kinds, errors). References are numpy computations from
the parameters, a manual loop, PIL/numpy arithmetic, and timm's own numbers.

The tests that mean the CPU pass ``device="cpu"`` (on a CUDA machine embed() would otherwise run
on the GPU with autocast); the ``cuda``-marked tests check the CUDA defaults (autocast dtype,
channels_last, the pinned output buffers) and are skipped without a GPU. Autocast is checked
both ways: equal to a hand-written autocast loop, and off the float32 result by about what bf16
rounding costs (between 2**-12 and 2**-7 of the output scale; measured 0.65 * 2**-8)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from contrastive.embedders import (
    Embedder,
    MLPEncoder,
    extract_state_dict,
    infer_feature_dim,
)
from contrastive.inference import embed

# small inputs keep the timm models fast; test_vit needs img_size to match its patch grid
TIMM_CASES = [
    ("test_vit", {"img_size": 32}, 32, 64),
    ("test_resnet", {}, 32, 96),
    ("resnet18", {}, 32, 512),
]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _l2(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


class PlainDataset(Dataset):
    """Map-style data set returning (x, int label) -- goes through the DataLoader path."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool-dropout: BN and dropout make train and eval modes differ."""

    def __init__(self, out=6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(32, out),
        )

    def forward(self, x):
        return self.body(x)


# ------------------------------------------------------------------------------ Embedder


@pytest.mark.parametrize("name,kwargs,size,feat", TIMM_CASES)
def test_timm_backbone_shape_norm_and_head(name, kwargs, size, feat):
    torch.manual_seed(0)
    model = Embedder(name, dim=16, pretrained=False, **kwargs).eval()
    assert model.feature_dim == feat  # timm's num_features for these architectures
    assert model.dim == 16
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        z = model(x)
        feats = model.backbone(x)
    assert z.shape == (3, 16) and z.dtype == torch.float32
    np.testing.assert_allclose(np.linalg.norm(_np(z), axis=1), 1.0, atol=1e-6)
    # reference: numpy linear head + L2 on the timm backbone's own features
    w, b = _np(model.head.weight), _np(model.head.bias)
    ref = _l2(_np(feats) @ w.T + b)
    np.testing.assert_allclose(_np(z), ref, atol=1e-5)


def test_head_none_keeps_features_and_normalize_false():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    keep = Embedder("test_resnet", dim=None, head=None).eval()
    assert keep.dim == keep.feature_dim == 96
    with torch.no_grad():
        np.testing.assert_allclose(_np(keep(x)), _l2(_np(keep.backbone(x))), atol=1e-6)
    raw = Embedder("test_resnet", dim=8, head="linear", normalize=False).eval()
    with torch.no_grad():
        z, f = raw(x), raw.backbone(x)
    np.testing.assert_allclose(_np(z), _np(f) @ _np(raw.head.weight).T + _np(raw.head.bias),
                               atol=1e-5)
    assert not np.allclose(np.linalg.norm(_np(z), axis=1), 1.0)


def test_mlp_head_is_simclr_projection():
    torch.manual_seed(0)
    model = Embedder("test_resnet", dim=8, head="mlp", head_hidden_dim=12).eval()
    lin1, bn, relu, lin2 = model.head
    assert isinstance(lin1, nn.Linear) and (lin1.in_features, lin1.out_features) == (96, 12)
    assert isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert isinstance(lin2, nn.Linear) and (lin2.in_features, lin2.out_features) == (12, 8)
    with torch.no_grad():  # non-trivial BN statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        f = _np(model.backbone(x))
        z = _np(model(x))
    h = f @ _np(lin1.weight).T + _np(lin1.bias)
    h = (h - _np(bn.running_mean)) / np.sqrt(_np(bn.running_var) + bn.eps)
    h = np.maximum(h * _np(bn.weight) + _np(bn.bias), 0)
    np.testing.assert_allclose(z, _l2(h @ _np(lin2.weight).T + _np(lin2.bias)), atol=1e-5)
    # default hidden width = feature_dim
    assert Embedder("test_resnet", dim=8, head="mlp").head[0].out_features == 96


def test_mlp_backbone_vectors_and_images():
    torch.manual_seed(0)
    model = Embedder("mlp", in_dim=64, hidden_dim=32, layers=1, dim=8).eval()
    assert isinstance(model.backbone, MLPEncoder)
    assert model.feature_dim == 32 and model.dim == 8
    assert model.data_config is None and model.eval_transform() is None
    x = torch.randn(6, 64)
    net = model.backbone.net
    h = np.maximum(_np(x) @ _np(net[0].weight).T + _np(net[0].bias), 0)
    h = h @ _np(net[2].weight).T + _np(net[2].bias)
    ref = _l2(h @ _np(model.head.weight).T + _np(model.head.bias))
    with torch.no_grad():
        np.testing.assert_allclose(_np(model(x)), ref, atol=1e-5)
        # 8x8 "images" are flattened to the same vectors
        np.testing.assert_allclose(_np(model(x.view(6, 1, 8, 8))), ref, atol=1e-5)
    with pytest.raises(ValueError, match="in_dim"):
        model(torch.randn(2, 10))
    # head=None: dim sets the encoder's out_dim
    bare = Embedder("mlp", in_dim=64, head=None, dim=5)
    assert bare.dim == bare.feature_dim == bare.backbone.num_features == 5
    with pytest.raises(ValueError, match="in_dim"):
        Embedder("mlp", dim=8)
    with pytest.raises(TypeError, match="unknown arguments"):
        Embedder("mlp", in_dim=4, depth=3)


def test_module_backbone_feature_dim_inference():
    torch.manual_seed(0)
    cnn = SmallCNN(out=6).train()
    model = Embedder(cnn, dim=4)
    assert model.feature_dim == 6  # by a dry forward
    assert cnn.training and all(m.training for m in cnn.modules())  # dry run restored modes
    assert model.data_config is None and model.eval_transform() is None
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)

    # a backbone returning a feature map is flattened: 8 channels x 2 x 2
    fmap = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(2))
    assert infer_feature_dim(fmap) == 32
    assert Embedder(fmap, dim=None, head=None).dim == 32

    class WithAttr(nn.Module):
        num_features = 7

        def forward(self, x):
            return x[:, :7]

    assert Embedder(WithAttr(), dim=3).feature_dim == 7
    assert Embedder(nn.Identity(), feature_dim=10, dim=3)(torch.randn(2, 10)).shape == (2, 3)
    with pytest.raises(ValueError, match="feature_dim"):
        Embedder(nn.Identity(), dim=3)  # nothing to infer from
    with pytest.raises(ValueError, match="feature_dim"):
        Embedder(nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)), dim=3)  # dry run fails
    with pytest.raises(TypeError, match="only apply to timm"):
        Embedder(SmallCNN(), dim=3, in_chans=1)
    with pytest.raises(TypeError, match="no serialisable config"):
        Embedder(SmallCNN(), dim=3).config()


def test_feature_dim_is_timm_pooled_output_width():
    """MobileNetV3's pooled features (head_hidden_size) are wider than num_features."""
    model = Embedder("mobilenetv3_small_050", dim=8).eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 64, 64))
    assert model.backbone.num_features != feats.shape[1] == model.feature_dim
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_timm_module_with_classifier_uses_dry_forward():
    import timm

    net = timm.create_model("test_vit", pretrained=False, num_classes=5).train()
    model = Embedder(net, dim=4)
    assert model.feature_dim == 5  # the logits, by a dry forward at timm's 160x160
    assert net.training


def test_timm_module_instance_keeps_data_config():
    import timm

    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model = Embedder(net, dim=4)
    assert model.feature_dim == 96
    assert model.data_config["input_size"] == (3, 160, 160)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"head": "conv"}, "head must be one of"),
        ({"head": "linear", "dim": None}, "pass dim"),
        ({"head": None, "dim": 32}, "dim=None"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"feature_dim": 5}, "drop feature_dim"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Embedder("test_resnet", **kwargs)


def test_unknown_timm_name_and_bad_type():
    with pytest.raises(ValueError, match="not a timm model name"):
        Embedder("resnet_does_not_exist")
    with pytest.raises(TypeError, match="backbone must be"):
        Embedder(42)


# ------------------------------------------------------------------------------ weights


class Opaque:
    """Not on torch's weights_only allowlist."""


def _trained_like(model: nn.Module) -> nn.Module:
    """Perturb every parameter/buffer so that loading really changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"model": sd, "step": 3},
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
        # a trainer-style checkpoint: numpy and python RNG state next to the model
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []},
                    "rng": {"numpy": np.random.get_state(), "python": random.getstate(),
                            "torch": torch.get_rng_state()}},
    ],
    ids=["raw", "ddp-prefix", "model-key", "state_dict-key+prefix", "trainer-ckpt"],
)
def test_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    src = _trained_like(Embedder("test_resnet", dim=8, head="mlp")).eval()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(src.state_dict()), path)
    torch.manual_seed(123)  # a different init, so equality comes from the file
    dst = Embedder("test_resnet", dim=8, head="mlp", weights=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    fresh = Embedder("test_resnet", dim=8, head="mlp").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), src(x))


def test_backbone_only_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    net = _trained_like(timm.create_model("test_resnet", num_classes=0)).eval()
    torch.save(net.state_dict(), tmp_path / "bb.pt")
    model = Embedder("test_resnet", dim=None, head=None, normalize=False,
                     weights=tmp_path / "bb.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        Embedder("test_resnet", dim=8, weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="local file path"):
        Embedder("test_resnet", dim=8, weights="https://example.com/w.pt")
    torch.save(Embedder("test_resnet", dim=4).state_dict(), tmp_path / "dim4.pt")
    with pytest.raises(ValueError, match="do not fit"):
        Embedder("test_resnet", dim=8, weights=tmp_path / "dim4.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights"):
        Embedder("test_resnet", dim=8, weights=tmp_path / "junk.pt")
    torch.save({"model": {}, "obj": Opaque()}, tmp_path / "opaque.pt")
    with pytest.raises(ValueError, match="Opaque.*weights_only"):
        Embedder("test_resnet", dim=8, weights=tmp_path / "opaque.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="must hold a dict"):
        Embedder("test_resnet", dim=8, weights=tmp_path / "list.pt")


def test_extract_state_dict_prefixes():
    t = torch.zeros(1)
    assert set(extract_state_dict({"module._orig_mod.a.w": t})) == {"a.w"}
    assert set(extract_state_dict({"_orig_mod.module.a.w": t})) == {"a.w"}
    # a prefix on only some keys is a real submodule name: kept
    assert set(extract_state_dict({"module.w": t, "head.w": t})) == {"module.w", "head.w"}
    with pytest.raises(ValueError, match="non-tensor"):
        extract_state_dict({"a": 1})


@pytest.mark.parametrize(
    "args",
    [
        ("test_vit", {"dim": 8, "head": "mlp", "img_size": 32}),
        ("test_resnet", {"dim": None, "head": None, "in_chans": 1, "normalize": False}),
        ("mlp", {"in_dim": 12, "hidden_dim": 16, "layers": 1, "dim": 4}),
        ("mlp", {"in_dim": 12, "head": None, "dim": 6}),
    ],
)
def test_config_round_trip(args):
    name, kwargs = args
    torch.manual_seed(0)
    src = _trained_like(Embedder(name, **kwargs)).eval()
    cfg = json.loads(json.dumps(src.config()))  # JSON-able
    dst = Embedder.from_config(cfg).eval()
    dst.load_state_dict(src.state_dict())
    assert (dst.dim, dst.feature_dim) == (src.dim, src.feature_dim)
    if name == "mlp":
        x = torch.randn(3, 12)
    else:
        x = torch.randn(3, kwargs.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    assert Embedder.from_config(cfg, pretrained=False).config() == cfg


# ------------------------------------------------------------------------------ data config


def _gray_image(value: int, size, mode="RGB"):
    from PIL import Image

    return Image.fromarray(np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value,
                                   dtype=np.uint8), mode=mode)


def test_eval_transform_sizes_and_normalisation():
    model = Embedder("test_resnet", dim=4)
    cfg = model.data_config
    assert cfg["input_size"] == (3, 160, 160)
    out = model.eval_transform()(_gray_image(100, (200, 90)))
    assert out.shape == (3, 160, 160)
    expected = (100 / 255 - np.array(cfg["mean"])) / np.array(cfg["std"])
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)

    vit = Embedder("test_vit", dim=4, img_size=64)
    assert vit.data_config["input_size"] == (3, 64, 64)
    img = _gray_image(30, (50, 70))
    assert vit.eval_transform()(img).shape == (3, 64, 64)
    assert vit(vit.eval_transform()(img)[None]).shape == (1, 4)

    r18 = Embedder("resnet18", dim=4, in_chans=1, input_size=48)
    cfg = r18.data_config
    assert cfg["input_size"] == (1, 48, 48)
    assert cfg["mean"] == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    out = r18.eval_transform()(_gray_image(200, (60, 60), mode="L"))
    assert out.shape == (1, 48, 48)
    np.testing.assert_allclose(out.mean().item(), (200 / 255 - cfg["mean"][0]) / cfg["std"][0],
                               atol=1e-5)
    wide = Embedder("test_resnet", dim=4, input_size=(40, 56))
    assert wide.eval_transform()(_gray_image(9, (80, 80))).shape == (3, 40, 56)
    assert Embedder.from_config(json.loads(json.dumps(wide.config()))).data_config == \
        wide.data_config
    with pytest.raises(ValueError, match="input_size"):
        Embedder("test_resnet", dim=4, input_size=(1, 2, 3))


# ------------------------------------------------------------------------------ embed


@pytest.fixture
def cnn_data():
    torch.manual_seed(0)
    model = SmallCNN(out=5)
    x = torch.randn(23, 3, 8, 8)
    y = torch.randint(0, 4, (23,))
    model.eval()
    with torch.no_grad():
        ref = torch.cat([model(x[i:i + 1]) for i in range(len(x))])  # one sample at a time
    model.train()
    return model, x, y, ref


@pytest.mark.parametrize("kind", ["tensor", "plain", "loader"])
def test_embed_equals_manual_eval_loop(cnn_data, kind):
    model, x, y, ref = cnn_data
    data = {"tensor": TensorDataset(x, y), "plain": PlainDataset(x, y),
            "loader": DataLoader(PlainDataset(x, y), batch_size=4)}[kind]
    emb, lab = embed(model, data, batch_size=5, device="cpu", progress=False)
    assert emb.dtype == torch.float32 and lab.dtype == torch.int64
    assert emb.device.type == "cpu" and emb.shape == (23, 5)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(lab, y)
    assert model.training and all(m.training for m in model.modules())


def test_embed_restores_mixed_modes_and_returns_autograd_tensors(cnn_data):
    model, x, y, ref = cnn_data
    model.body[1].eval()  # a frozen BN inside a training model stays frozen
    emb, lab = embed(model, TensorDataset(x, y), batch_size=8, device="cpu",
                     progress=False)
    assert model.training and not model.body[1].training and model.body[5].training
    assert not emb.is_inference() and not lab.is_inference()
    w = torch.zeros(5, 3, requires_grad=True)  # e.g. a linear probe on the embeddings
    (emb @ w).sum().backward()
    torch.testing.assert_close(w.grad, emb.sum(0)[:, None].expand(5, 3))


def test_embed_numpy_inputs_and_float64(cnn_data):
    model, x, y, ref = cnn_data
    xs = x.double().numpy()  # float64 numpy images, numpy int labels
    data = PlainDataset(xs, y.numpy())
    emb, lab = embed(model, data, batch_size=7, device="cpu", progress=False)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(lab, y)

    def numpy_collate(items):
        return np.stack([a for a, _ in items]), [b for _, b in items]

    loader = DataLoader(data, batch_size=6, collate_fn=numpy_collate)
    emb2, lab2 = embed(model, loader, device="cpu", progress=False)
    torch.testing.assert_close(emb2, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(lab2, y)


def _autocast_loop(model, x, batch_size, device, dtype, channels_last):
    """The independent reference for autocast: the eval-mode forward of each batch under
    ``torch.autocast(dtype)``, as a user would write it."""
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().cpu())
    model.train()
    return torch.cat(out)


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# bf16 keeps 8 significant bits: one rounding costs up to 2**-9 relatively. The CPU case below
# measured 0.65 * 2**-8 against float32 (a few roundings through conv, BN and linear).
BF16_MAX_REL = 2 * 2**-8   # ~3x the measured error: a wrong cast or a lost scale exceeds it
BF16_MIN_REL = 2**-12      # below this nothing was computed in bf16


def test_embed_amp_and_channels_last_on_cpu(cnn_data):
    model, x, y, ref = cnn_data
    conv_w = model.body[0].weight
    emb, _ = embed(model, TensorDataset(x, y), batch_size=8, device="cpu", progress=False,
                   channels_last=True)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert conv_w.is_contiguous()  # memory format restored
    emb_bf16, _ = embed(model, TensorDataset(x, y), batch_size=8, device="cpu",
                        progress=False, amp=True)
    assert emb_bf16.dtype == torch.float32
    # it ran under bf16 autocast: equal to the hand-written autocast loop ...
    manual = _autocast_loop(model, x, 8, "cpu", torch.bfloat16, channels_last=False)
    torch.testing.assert_close(emb_bf16, manual, atol=1e-6, rtol=0)
    # ... and bf16 changed the numbers, by about what bf16 rounding costs
    err = _relative_error(emb_bf16, ref)
    assert BF16_MIN_REL < err < BF16_MAX_REL, err
    assert model.training


class ViewBackbone(nn.Module):
    """A custom backbone that flattens its feature map with ``.view`` (fails on channels_last)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)
        return f.view(f.shape[0], -1)


def test_channels_last_default_only_for_known_modules():
    from contrastive.inference import channels_last_safe

    assert channels_last_safe(Embedder("test_resnet", dim=4))
    assert channels_last_safe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    assert not channels_last_safe(ViewBackbone())  # a custom forward may .view()
    assert not channels_last_safe(SmallCNN())  # a custom class, even if it would work
    assert not channels_last_safe(nn.Linear(3, 4))  # nothing 4-D to lay out
    x, y = torch.randn(5, 3, 6, 6), torch.arange(5)
    with pytest.raises(RuntimeError, match="view"):  # why the default is off for it
        embed(ViewBackbone(), TensorDataset(x, y), device="cpu", progress=False,
              channels_last=True)


def test_amp_dtype_uses_fp16_where_bf16_is_emulated(monkeypatch):
    import contextlib

    from contrastive.inference import amp_dtype

    assert amp_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        # torch's own check counts emulation as support unless told not to
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: including_emulation or n)
        assert amp_dtype("cuda:0") == expected
    # older torch without the keyword: the compute capability decides (>= 8.0 native)
    def old_check():
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_check)
    for cap, expected in (((7, 0), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: c)
        assert amp_dtype("cuda") == expected


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_embed_defaults_autocast_channels_last_and_restore():
    """The CUDA defaults: autocast to amp_dtype, channels_last for a torch.nn model, outputs
    through the pinned stager in order (23 rows in batches of 5), model restored to the CPU."""
    from contrastive.inference import amp_dtype

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6))
    x, y = torch.randn(23, 3, 8, 8), torch.arange(23)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    emb, lab = embed(model, TensorDataset(x, y), batch_size=5, progress=False)
    assert emb.device.type == "cpu" and emb.dtype == torch.float32 and torch.equal(lab, y)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model[0].weight.is_contiguous() and model.training
    dtype = amp_dtype("cuda")
    manual = _autocast_loop(model.cuda(), x, 5, "cuda", dtype, channels_last=True)
    model.cpu()
    torch.testing.assert_close(emb, manual, atol=2**-8 * float(ref.abs().max()), rtol=0)
    err = _relative_error(emb, ref)
    assert BF16_MIN_REL < err < BF16_MAX_REL, err
    full, _ = embed(model, TensorDataset(x, y), batch_size=5, progress=False, amp=False,
                    channels_last=False)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)  # TF32 may serve float32


@pytest.mark.cuda
@cuda
@pytest.mark.skipif(not hasattr(torch.cuda, "host_memory_stats"), reason="torch too old")
def test_cuda_embed_keeps_no_pinned_copy_of_the_result():
    """Outputs go through two reused pinned buffers: the pinned memory that torch's host
    allocator holds afterwards is about two batches, not the 40 MB result."""
    model = nn.Linear(4, 512)
    x, y = torch.randn(20_000, 4), torch.zeros(20_000, dtype=torch.long)
    torch._C._host_emptyCache()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    emb, _ = embed(model, TensorDataset(x, y), batch_size=50, progress=False, amp=False)
    held = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before
    assert emb.shape == (20_000, 512) and emb.numel() * 4 == 40_960_000
    assert held < 4 * 2**20, held
    with torch.no_grad():
        torch.testing.assert_close(emb, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_embed_custom_view_backbone_runs_by_default():
    torch.manual_seed(0)
    model = ViewBackbone()
    x, y = torch.randn(7, 3, 6, 6), torch.arange(7)
    emb, _ = embed(model, TensorDataset(x, y), batch_size=4, progress=False, amp=False)
    with torch.no_grad():
        torch.testing.assert_close(emb, model(x), atol=1e-4, rtol=1e-4)


def test_embed_embedder_timm_and_dataparallel():
    torch.manual_seed(0)
    model = Embedder("test_resnet", dim=8)
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    emb, _ = embed(nn.DataParallel(model), TensorDataset(x, y), batch_size=4, device="cpu",
                   progress=False)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, atol=1e-5)
    assert model.training


def test_embed_progress_bar_writes(cnn_data, capsys):
    model, x, y, _ = cnn_data
    embed(model, TensorDataset(x, y), batch_size=8, device="cpu", progress=True)
    assert "embed" in capsys.readouterr().err
    embed(model, TensorDataset(x, y), batch_size=8, device="cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_embed_errors(cnn_data):
    model, x, y, _ = cnn_data
    with pytest.raises(ValueError, match="batch_size"):
        embed(model, TensorDataset(x, y), batch_size=0, progress=False)
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        embed(model, TensorDataset(x), progress=False)
    with pytest.raises(TypeError, match="Dataset"):
        embed(model, [(x, y)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        embed(model, TensorDataset(x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match=r"\[B, dim\]|\[4, dim\]"):
        embed(nn.Identity(), TensorDataset(x[:4], y[:4]), progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        embed(lambda t: t, TensorDataset(x, y), progress=False)
    assert model.training  # restored after the failures too
