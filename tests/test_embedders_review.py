"""Review tests for contrastive.embedders and contrastive.inference: each pins one behaviour
against an independent reference -- a plain forward pass of the same model in eval mode under
``torch.no_grad``, timm's own model and its own loading of a local checkpoint, or the message
that names the argument and the fix. CPU only, no network, timm models built with
``pretrained=False`` at tiny image sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a two-rank worker script
    sys.path.insert(0, str(ROOT))

from contrastive.embedders import Embedder, infer_feature_dim  # noqa: E402
from contrastive.inference import embed  # noqa: E402


class ListSamples(Dataset):
    """Samples ``(x as a Python list of floats, int label)``: a valid (x, y) data set."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].tolist(), int(self.y[i])


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).float()


# ------------------------------------------------------------------ inputs that are lists


def test_embed_dataset_of_list_samples_equals_plain_forward():
    """default_collate turns a batch of B samples whose x is a list of d floats into d tensors
    of B values; embed() read that as a [d, B] input, so with d == B (here 3 and 3) every
    embedding was computed from a transposed batch, silently."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.arange(6)
    model = nn.Linear(3, 2)
    z, labels = embed(model, ListSamples(x, y), batch_size=3, device="cpu", progress=False)
    torch.testing.assert_close(z, _reference(model, x))
    assert torch.equal(labels, y)


def test_embed_loader_of_list_samples_equals_plain_forward():
    """The same through the caller's own DataLoader (default_collate), sizes 7 rows of 3
    features in batches of 3: one full batch was transposed, the last one raised."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.arange(7)
    model = nn.Linear(3, 2)
    z, labels = embed(model, DataLoader(ListSamples(x, y), batch_size=3), device="cpu",
                      progress=False)
    torch.testing.assert_close(z, _reference(model, x))
    assert torch.equal(labels, y)


# ------------------------------------------------------------------ errors that name the fix


class PILSamples(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(np.zeros((8, 8, 3), np.uint8)), i


def test_embed_pil_images_without_transform_names_the_fix():
    model = Embedder("mlp", in_dim=192, dim=4)
    with pytest.raises(TypeError, match=r"PIL.*eval_transform"):
        embed(model, PILSamples(), device="cpu", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_embed_cuda_without_gpu_names_the_argument():
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match=r"device='cuda'.*device='cpu'"):
        embed(nn.Linear(3, 2), data, device="cuda", progress=False)


def test_embed_string_labels_name_the_fix():
    class Named(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return torch.zeros(3), "cat"

    with pytest.raises(TypeError, match="integer class ids"):
        embed(nn.Linear(3, 2), Named(), device="cpu", progress=False)


# ------------------------------------------------------------------ weights


def test_timm_classification_checkpoint_loads_like_timm(tmp_path):
    """A timm checkpoint of the classification model (``fc.*`` included), saved by DDP inside
    ``{"state_dict": ...}``: timm's own loading of the local file with ``num_classes=0`` drops the
    classifier; the Embedder refused it (unexpected keys fc.weight, fc.bias)."""
    import timm

    torch.manual_seed(0)
    full = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()},
                "epoch": 3}, path)
    plain = tmp_path / "plain.pth"
    torch.save(full.state_dict(), plain)
    ref = timm.create_model("test_resnet", num_classes=0, pretrained=True,
                            pretrained_cfg_overlay={"file": str(plain)})
    emb = Embedder("test_resnet", dim=None, head=None, normalize=False, weights=path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_reference(emb, x), _reference(ref, x))
    # still strict: a key that is not the classifier's is refused
    state = dict(full.state_dict(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match="extra"):
        Embedder("test_resnet", dim=None, head=None).load_weights(state)
    # and a classifier the backbone does have (num_classes > 0) is not dropped
    with pytest.raises(ValueError, match="fc.weight"):
        Embedder(timm.create_model("test_resnet", num_classes=5), dim=4).load_weights(
            full.state_dict())


# ------------------------------------------------------------------ feature sizes


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet18", {"in_chans": 1}, (2, 1, 32, 32)),
    ("vit_tiny_patch16_224", {"img_size": 32}, (2, 3, 32, 32)),
])
def test_feature_dim_of_a_timm_classifier_module_built_with_other_input(name, kwargs, shape):
    """A timm model with a classifier passed as a module: the dry forward used timm's default
    input (3 x 224 x 224) whatever ``in_chans`` / ``img_size`` the model was built with."""
    import timm

    model = timm.create_model(name, num_classes=10, **kwargs)
    want = _reference(model, torch.randn(shape)).shape[1]
    assert infer_feature_dim(model) == want
    model.train()
    emb = Embedder(model, dim=4)
    assert emb.feature_dim == want and model.training


def test_backbone_output_wider_than_feature_dim_is_an_error():
    """timm's ``global_pool=''`` keeps the feature map (512 x 2 x 2 = 2048 numbers at 64 px), while
    ``feature_dim`` / ``dim`` said 512: with head=None the embeddings were silently wider than
    ``dim``, with a head the error was a bare matmul shape mismatch."""
    import timm

    x = torch.randn(2, 3, 64, 64)
    width = _reference(timm.create_model("resnet18", num_classes=0, global_pool=""),
                       x).flatten(1).shape[1]
    keep = Embedder("resnet18", global_pool="", dim=None, head=None).eval()
    assert keep.dim != width
    with pytest.raises(ValueError, match=rf"{width} features.*feature_dim"):
        keep(x)
    head = Embedder("resnet18", global_pool="", dim=4).eval()
    with pytest.raises(ValueError, match=rf"{width} features.*feature_dim"):
        head(x)


# ------------------------------------------------------------------ data config


def _gray(size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(np.full(size[::-1], 120, dtype=np.uint8), mode="L")


@pytest.mark.parametrize("make", ["name_in_chans", "module_in_chans", "module_img_size"])
def test_eval_transform_fits_the_backbone_it_was_built_with(make):
    """The transform must give what the backbone takes: timm's resolve_data_config uses
    ``in_chans`` only together with an image size, so ``in_chans=1`` alone gave 3-channel
    RGB-normalised inputs (a 1-channel image then fails in Normalize); a timm model passed as a
    module kept timm's default 3 x 224 x 224 whatever it was built with."""
    import timm

    if make == "name_in_chans":
        emb = Embedder("test_resnet", in_chans=1, dim=4)
        want = (1, 160, 160)  # test_resnet's pretrained size, one channel
    elif make == "module_in_chans":
        emb = Embedder(timm.create_model("test_resnet", in_chans=1, num_classes=0), dim=4)
        want = (1, 160, 160)
    else:
        emb = Embedder(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0),
                       dim=4)
        want = (3, 32, 32)
    cfg = emb.data_config
    assert cfg["input_size"] == want and len(cfg["mean"]) == len(cfg["std"]) == want[0]
    image = _gray((50, 40)) if want[0] == 1 else _gray((50, 40)).convert("RGB")
    x = emb.eval_transform()(image)
    assert tuple(x.shape) == want
    assert _reference(emb, x[None]).shape == (1, 4)


# ------------------------------------------------------------------ two gloo ranks


def _list_problem() -> tuple[nn.Module, dict]:
    """The model and the data of the two-rank run: 7 samples whose input is a list of 3 floats
    (odd: the shards are 3 and 4 rows), as a Dataset and through a DataLoader (batches of 3)."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.arange(7) % 3
    data = ListSamples(x, y)
    return nn.Linear(3, 2), {"dataset": data, "loader": DataLoader(data, batch_size=3)}


def _worker(out_dir: Path) -> None:
    from contrastive import distributed as D
    from contrastive.inference import embed_distributed

    torch.set_num_threads(1)
    rank, _, _, _ = D.setup(device="cpu")
    model, cases = _list_problem()
    res = {name: embed_distributed(model, data, batch_size=3, device="cpu", progress=False)
           for name, data in cases.items()}
    # a NaN input in row 5 (rank 1's shard): every rank raises the same error after the
    # gather, naming the global row (a rank raising alone would leave the other in the gather)
    x, y = cases["dataset"].x.clone(), cases["dataset"].y
    x[5, 1] = float("nan")
    try:
        embed_distributed(model, ListSamples(x, y), batch_size=3, device="cpu", progress=False)
        res["nan_error"] = ""
    except ValueError as exc:
        res["nan_error"] = str(exc)
    z, _ = embed_distributed(model, ListSamples(x, y), batch_size=3, device="cpu",
                             progress=False, check_finite=False)
    res["nan_rows"] = (~torch.isfinite(z).all(1)).nonzero().flatten()
    torch.save(res, out_dir / f"rank{rank}.pt")
    D.cleanup()


def test_embed_distributed_of_list_samples_equals_plain_forward(tmp_path):
    """Also: non-finite embeddings raise on every rank alike, after the gather."""
    from two_ranks import launch_ranks

    launch_ranks(__file__, tmp_path, 2, timeout=120)
    model, cases = _list_problem()
    x, y = cases["dataset"].x, cases["dataset"].y
    want = _reference(model, x)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["nan_error"].startswith(
            "embed() produced NaN or Inf in 1 of 7 rows (first: [5]);"), res["nan_error"]
        assert res["nan_rows"].tolist() == [5]
        for name in cases:
            z, labels = res[name]
            torch.testing.assert_close(z, want, msg=f"rank {rank}, {name}")
            assert torch.equal(labels, y)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_embed_names_non_finite_rows_and_the_fix():
    """Embeddings with NaN or Inf raise a ValueError naming the rows (nothing downstream sees
    them silently); ``check_finite=False`` returns them as they are, equal to a plain forward."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(9, 3), torch.arange(9) % 3
    x[4, 0] = float("inf")
    x[7, 2] = float("nan")
    data = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match=r"^embed\(\) produced NaN or Inf in 2 of 9 rows "
                                         r"\(first: \[4, 7\]\); check the model"):
        embed(model, data, batch_size=4, device="cpu", progress=False)
    z, labels = embed(model, data, batch_size=4, device="cpu", progress=False,
                      check_finite=False)
    torch.testing.assert_close(z, _reference(model, x), equal_nan=True)
    assert torch.equal(labels, y)


class _InPlaceScale(nn.Module):
    """A model that normalises its input in place, as some user backbones do."""

    def forward(self, x):
        return x.mul_(2.0).flatten(1)


def test_embed_tensor_dataset_does_not_change_the_callers_data():
    from torch.utils.data import TensorDataset

    x = torch.arange(24, dtype=torch.float32).view(6, 4)
    before = x.clone()
    z, y = embed(_InPlaceScale(), TensorDataset(x, torch.arange(6)), batch_size=4,
                 device="cpu", progress=False)
    assert torch.equal(x, before)  # the caller's tensor is as it was
    assert torch.equal(z, before * 2.0) and y.tolist() == list(range(6))
