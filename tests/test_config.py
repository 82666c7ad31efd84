"""Typed configs: values read as users write them, one-line errors that name the field, the
value, what was expected and the closest valid name; the compare cache key; ``pml:`` losses by
name from Python."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from contrastive.app.compare import CompareConfig, cell_key, resolved_cell_config, train_config_for
from contrastive.app.config import ConfigError, TrainConfig, UserError, load_mapping

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_values_in_usual_spellings(tmp_path):
    p = _yaml(tmp_path, 'lr: 1e-3\nweight_decay: "5e-4"\nsteps: 1_000\nwarmup_steps: 1e2\n'
              'final_probe: "false"\naugment: true\nresume: auto\n')
    assert yaml.safe_load(p.read_text())["lr"] == "1e-3"  # PyYAML's reading, the trap itself
    cfg = TrainConfig.from_file(p)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 5e-4
    assert cfg.steps == 1000 and cfg.warmup_steps == 100 and isinstance(cfg.steps, int)
    assert cfg.final_probe is False and cfg.augment is True and cfg.resume == "auto"
    c = CompareConfig.from_dict({"losses": "infonce, triplet", "seeds": "0,1", "steps": "2e2"})
    assert c.losses == ("infonce", "triplet") and c.seeds == (0, 1) and c.steps == 200
    c = CompareConfig.from_dict({"losses": ["infonce"], "seeds": [3]})
    assert c.losses == ("infonce",) and c.seeds == (3,)


@pytest.mark.parametrize("data, field, value, expected, suggestion", [
    ({"lossy": "x"}, "lossy", "'x'", "TrainConfig fields", "loss"),
    ({"lr": "fast"}, "lr", "'fast'", "valid number", None),
    ({"final_probe": "yes"}, "final_probe", "'yes'", "true or false", None),
    ({"final_probe": 1}, "final_probe", "1", "true or false", None),
    ({"steps": 2.5}, "steps", "2.5", "valid integer", None),
    ({"batch_size": 0}, "batch_size", "0", "greater than 0", None),
    ({"schedule": "cosin"}, "schedule", "'cosin'", "'cosine', 'constant' or 'step'", "cosine"),
    ({"loss": "infonse"}, "loss", "'infonse'", "pml:<ClassName>", "infonce"),
    ({"loss_kwargs": {"temprature": 0.1}}, "loss_kwargs.temprature", "0.1",
     "keyword of loss 'infonce'", "temperature"),
    ({"loss": "triplet", "loss_kwargs": {"margn": 0.1}}, "loss_kwargs.margn", "0.1",
     "keyword of loss 'triplet'", "margin"),
    ({"critic": "bilnear"}, "critic", "'bilnear'", "one of", "bilinear"),
    ({"critic": "bilinear", "critic_kwargs": {"init_": "zeros"}}, "critic_kwargs.init_",
     "'zeros'", "keyword of critic 'bilinear'", "init"),
    ({"loss": "pml:NTXentLos"}, "loss", "'pml:NTXentLos'", "pytorch-metric-learning",
     "pml:NTXentLoss"),
    ({"loss": "pml:NTXentLoss", "loss_kwargs": {"temperatur": 0.1}},
     "loss_kwargs.temperatur", "0.1", "keyword of loss 'pml:NTXentLoss'", "temperature"),
    ({"loss": "pml:NTXentLoss", "critic": "dot"}, "critic", "'dot'", "no critic", None),
    ({"views": 1}, "views", "1", "0 (supervised) or >= 2", None),
])
def test_config_errors_name_field_value_expectation_and_closest_name(
        data, field, value, expected, suggestion):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    err = info.value
    text = str(err)
    assert "\n" not in text
    assert err.field == field and f"'{field}'" in text
    assert value in text and expected in text, text
    assert err.suggestion == suggestion
    if suggestion:
        assert text.endswith(f"did you mean '{suggestion}'?")
    assert isinstance(err, UserError) and isinstance(err, ValueError)


def test_compare_config_errors():
    with pytest.raises(ConfigError, match=r"'loss_kwargs.tripet'.*did you mean 'triplet'"):
        CompareConfig.from_dict({"losses": "infonce,triplet",
                                 "loss_kwargs": {"tripet": {"margin": 0.1}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'step'.*did you mean 'steps'"):
        CompareConfig.from_dict({"step": 3})
    with pytest.raises(ConfigError, match=r"'seeds': got '0,a', expected a valid integer"):
        CompareConfig.from_dict({"seeds": "0,a"})
    with pytest.raises(ConfigError, match=r"'train.output'.*compare sets it for each cell"):
        CompareConfig.from_dict({"train": {"output": "x"}})
    cfg = CompareConfig.from_dict({"losses": "infonce", "train": {"lr": "oops"}})
    with pytest.raises(ConfigError, match=r"'train.lr'.*'oops'"):  # the key as written
        train_config_for(cfg, "infonce", 0)


def test_syntax_errors_name_the_file_and_line(tmp_path):
    p = _yaml(tmp_path, "loss: infonce\nlr: [1e-3\nsteps: 3\n")
    with pytest.raises(UserError, match=r"c\.yaml line \d+, column \d+: YAML syntax error"):
        load_mapping(p)
    t = tmp_path / "c.toml"
    t.write_text("steps = = 3\n")
    with pytest.raises(UserError, match=r"c\.toml: TOML syntax error"):
        load_mapping(t)
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_mapping(tmp_path / "l.yaml")


def test_example_configs_are_valid():
    t = TrainConfig.from_file(ROOT / "examples/configs/train.yaml")
    assert t.lr == 1e-3 and t.loss_kwargs == {"temperature": 0.1}
    c = CompareConfig.from_file(ROOT / "examples/configs/compare.yaml")
    assert c.losses == ("infonce", "triplet", "npair") and c.seeds == (0, 1)
    assert train_config_for(c, "triplet", 0).loss_kwargs["margin"] == 0.1
    assert train_config_for(c, "infonce", 0).lr == 2e-3


def test_cell_key_follows_every_setting_that_decides_the_result():
    base = CompareConfig.from_dict({"losses": "infonce,triplet", "steps": 50})
    key = cell_key(train_config_for(base, "infonce", 0))
    # the constructor's own default written out is the same cell
    same = CompareConfig.from_dict({"losses": "infonce,triplet", "steps": 50,
                                    "loss_kwargs": {"infonce": {"temperature": 0.1}}})
    assert cell_key(train_config_for(same, "infonce", 0)) == key
    # where it is written and how it is shown are not part of it
    other_out = CompareConfig.from_dict({"losses": "infonce", "steps": 50, "output": "x",
                                         "progress": False})
    assert cell_key(train_config_for(other_out, "infonce", 0)) == key
    changes = [{"steps": 400}, {"critic": "dot"}, {"batch_size": 32}, {"backbone": "resnet18"},
               {"train": {"lr": 2e-3}}, {"train": {"dim": 32}}, {"train": {"schedule": "step"}},
               {"train": {"optimizer": "sgd"}}, {"train": {"eval_split": "train"}},
               {"dataset": "digits_image"},
               {"loss_kwargs": {"infonce": {"temperature": 0.2}}}]
    keys = {key}
    for change in changes:
        c = CompareConfig.from_dict({"losses": "infonce", "steps": 50, **change})
        keys.add(cell_key(train_config_for(c, "infonce", 0)))
    keys.add(cell_key(train_config_for(base, "infonce", 1)))  # the seed
    keys.add(cell_key(train_config_for(base, "triplet", 0)))  # the loss
    assert len(keys) == len(changes) + 3
    resolved = resolved_cell_config(train_config_for(base, "triplet", 0))
    assert resolved["loss_kwargs"]["margin"] == 0.2 and "mining" in resolved["loss_kwargs"]
    assert resolved["steps"] == 50 and "library_version" in resolved


def test_pml_loss_by_name_in_python_matches_pml():
    from pytorch_metric_learning import losses as pml_losses

    import losses

    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.arange(8).repeat(2)
    ours = losses.get("pml:NTXentLoss", temperature=0.2)
    ref = pml_losses.NTXentLoss(temperature=0.2)
    assert type(ours) is pml_losses.NTXentLoss
    a, b = float(ours(emb, labels)), float(ref(emb, labels))
    assert math.isfinite(a) and a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="did you mean 'pml:NTXentLoss'"):
        losses.get("pml:NTXentLos")


def test_steps_and_epochs_together_are_refused():
    """With ``epochs`` set the run's length is epochs x batches per epoch; a ``steps`` given
    beside it was silently ignored. It is refused, naming both; ``epochs`` alone (``steps`` at
    its default) and ``steps`` alone stay accepted."""
    from contrastive.app.config import ConfigError, TrainConfig

    assert TrainConfig.from_dict({"epochs": 2}).epochs == 2
    assert TrainConfig.from_dict({"steps": 40}).steps == 40
    with pytest.raises(ConfigError, match=r"'steps'.*got 100.*epochs=2 decides"):
        TrainConfig.from_dict({"epochs": 2, "steps": 100})
    with pytest.raises(ConfigError, match="epochs=3"):
        TrainConfig.from_dict({"steps": 40}).replace(epochs=3)
