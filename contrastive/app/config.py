"""Training configuration: one typed dataclass, loadable from YAML, TOML or JSON, checked by
pydantic against its field types before anything trains.

Every field has a default that trains the embedded default (digits, an MLP encoder, InfoNCE) on
two CPU cores in seconds; a config file only names what differs.

Values are read the way people write them: numbers in any usual spelling (``1e-3``, ``"3e-4"``,
``1_000``, ``1e3`` for an integer field) become numbers, and ``true``/``false`` are not numbers;
booleans are ``true``/``false`` only (``"false"`` is false, ``"yes"`` or ``1`` are errors; in a
YAML file or a ``--set`` value the YAML 1.1 words ``yes``/``no``/``on``/``off`` are errors too
(:func:`yaml_load`), not booleans); a list field takes a YAML list or a comma string
(``infonce,triplet``). A wrong type, an unknown key or a misspelled keyword inside
``loss_kwargs`` / ``critic_kwargs`` (checked against the loss's or critic's constructor) raises
:class:`ConfigError`: one line naming the field, the value, what was expected and the closest
valid name. :class:`UserError` is the base of every mistake in what a user asked for; the command
line prints those as one ``error:`` line with exit status 2 and everything else as a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from torch import nn

from ..errors import UserError

__all__ = [
    "UserError",
    "ConfigError",
    "TrainConfig",
    "load_mapping",
    "yaml_load",
    "refuse_yaml_bool_words",
    "validate_fields",
    "check_loss",
    "check_warmup",
    "resolved_kwargs",
    "closest",
]


class ConfigError(UserError):
    """A config value that does not fit its field: names the field, the value, what was
    expected and (when there is one) the closest valid name."""

    def __init__(self, field: str, value: Any, expected: str, suggestion: str | None = None,
                 *, unknown: bool = False, source: str | None = None) -> None:
        self.field, self.value, self.expected = field, value, expected
        self.suggestion, self.source, self.unknown = suggestion, source, unknown
        where = f" in {source}" if source else ""
        if unknown:
            text = (f"unknown config key '{field}'{where} (value {_short(value)}); "
                    f"expected {expected}")
        else:
            text = f"config field '{field}'{where}: got {_short(value)}, expected {expected}"
        if suggestion:
            text += f"; did you mean '{suggestion}'?"
        super().__init__(text)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``name`` (``difflib.get_close_matches``, cutoff 0.6), or None."""
    hits = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return hits[0] if hits else None


# ------------------------------------------------------------------------------ value readers


def _number(value: Any) -> Any:
    """Numbers as people write them: ``"1e-3"`` (PyYAML reads ``1e-3`` as a string), ``"1_000"``,
    ``1e3`` for an integer field. A boolean is refused (pydantic would read ``true`` as 1).
    Anything else goes on unchanged for pydantic to judge."""
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean (write the number itself, e.g. 1 or 0)")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return value
        if math.isfinite(number) and number.is_integer() and ("e" in text.lower()):
            return int(number)
        return number
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return value  # pydantic accepts an exact float for an int field
    return value


def _boolean(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, str) and value.strip().lower() in _YAML11_BOOLS:
        raise ValueError(f"true or false ({value.strip()!r} is not a boolean here)")
    raise ValueError("true or false")


def _text_list(value: Any) -> Any:
    """A YAML list, or a comma string ``"a,b"``; items stripped, empty items dropped."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def _number_list(value: Any) -> Any:
    value = _text_list(value)
    if isinstance(value, (list, tuple)):
        return [_number(v) for v in value]
    return value


def _text(value: Any) -> Any:
    """A path or a device as text: ``Path("runs/a")`` (what a Python caller writes) becomes
    ``"runs/a"``, ``torch.device("cpu")`` ``"cpu"``; anything else goes on unchanged."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__name__ == "device" and type(value).__module__ == "torch":
        return str(value)
    return value


PosInt = Annotated[int, BeforeValidator(_number), Field(gt=0)]
NonNegInt = Annotated[int, BeforeValidator(_number), Field(ge=0)]
PosFloat = Annotated[float, BeforeValidator(_number), Field(gt=0)]
#: a rate: positive and finite (``inf`` would pass ``> 0`` and diverge at the first step)
Rate = Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)]
#: NumPy's global seed (``np.random.seed``) takes 32 bits
Seed = Annotated[int, BeforeValidator(_number), Field(ge=0, lt=2**32)]
Text = Annotated[str, BeforeValidator(_text)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
TextList = Annotated[tuple[str, ...], BeforeValidator(_text_list)]
IntList = Annotated[tuple[int, ...], BeforeValidator(_number_list)]

_PYDANTIC = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


@dataclass
class TrainConfig:
    """Everything :func:`contrastive.app.train.fit` needs.

    Data: ``dataset`` (a name from ``contrastive.datasets.available_datasets()``), ``data_dir``
    (local root for the real data sets), ``views`` (0: supervised batches of ``batch_size //
    m_per_class`` classes x ``m_per_class``; >= 2: self-supervised, that many augmented views per
    instance with instance ids as labels), ``augment`` (training augmentation preset).

    Model: ``backbone`` (a timm model name, ``"mlp"`` for vector data, or -- from Python -- any
    ``nn.Module``; its checkpoints then hold the weights but not the code, so resuming or
    reloading needs the same module passed again), ``backbone_kwargs``, ``dim`` and ``head`` of
    the embedding, ``pretrained``/``weights``.

    Loss: ``loss`` (a name from ``losses.available()`` or ``"pml:ClassName"`` for a
    pytorch-metric-learning loss), ``loss_kwargs``, and optionally ``critic`` +
    ``critic_kwargs`` (a name from ``contrastive.critics.available()``) to override the loss's
    default critic.

    Optimisation: ``optimizer`` ("adamw", "adam" or "sgd"), ``lr``, ``proxy_lr`` (the
    learning rate of a loss's proxies or learnable margin, ``losses.proxies``; ``None``: 100 x
    ``lr``, Kim et al. 2020's ratio; rates are finite), ``weight_decay``,
    ``momentum``, ``schedule`` ("cosine", "constant" or "step"), ``warmup_steps`` (fewer than
    the run's steps), ``steps`` (or ``epochs``), ``grad_clip`` (max global norm, ``None`` for
    off), ``amp`` (``None``: autocast on CUDA only, bf16, or fp16 with a gradient scaler on
    GPUs without native bf16), ``seed`` (``0 <= seed < 2**32``, NumPy's range).

    Paths (``output``, ``data_dir``, ``weights``) may be given as ``os.PathLike`` and ``device``
    as a ``torch.device``; they are kept as text.

    Bookkeeping: ``output`` directory (``log.jsonl``, ``log.csv``, ``checkpoints/``,
    ``result.json``), ``eval_every``, ``log_every``, ``checkpoint_every`` (steps), ``resume``
    (``False``: the folder must not hold a run unless ``overwrite``; ``True``: continue from
    ``checkpoints/last.pt``, which must exist and match these settings; ``"auto"``: continue when
    a checkpoint exists, else start fresh), ``overwrite`` (replace a run already in ``output``;
    not together with ``resume``), ``final_probe`` (linear probe + k-NN classifier at the end),
    ``progress``.
    """

    __pydantic_config__ = _PYDANTIC

    dataset: str = "digits"
    data_dir: Text | None = None
    train_split: str = "train"
    eval_split: str = "test"
    views: NonNegInt = 0
    augment: Bool = False
    backbone: str | nn.Module = "mlp"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dim: PosInt = 64
    head: Literal["linear", "mlp"] | None = "linear"
    normalize: Bool = False
    pretrained: Bool = False
    weights: Text | None = None
    loss: str = "infonce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    critic: str | None = None
    critic_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: PosInt = 64
    m_per_class: PosInt = 8
    steps: PosInt = 500
    epochs: PosInt | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Rate = 1e-3
    proxy_lr: Rate | None = None
    weight_decay: Annotated[float, BeforeValidator(_number),
                            Field(ge=0, allow_inf_nan=False)] = 1e-4
    momentum: Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)] = 0.9
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_steps: NonNegInt = 0
    grad_clip: PosFloat | None = 5.0
    amp: Bool | None = None
    seed: Seed = 0
    eval_every: NonNegInt = 0
    log_every: PosInt = 10
    checkpoint_every: NonNegInt = 100
    output: Text = "runs/train"
    resume: Bool | Literal["auto"] = False
    overwrite: Bool = False
    final_probe: Bool = True
    device: Text | None = None
    num_workers: NonNegInt = 0
    progress: Bool = True

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
        """Build from a mapping, checked against the field types (:class:`ConfigError` on an
        unknown key, a wrong type, or an unknown loss / critic keyword)."""
        return validate_fields(cls, data, source=source).validated(source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load ``.yaml``/``.yml``, ``.toml`` or ``.json``."""
        return cls.from_dict(load_mapping(path), source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self._fields(), **changes})

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; a custom ``nn.Module`` backbone appears as
        ``"<module ClassName>"``."""
        out = dataclasses.asdict(dataclasses.replace(self, backbone="")) if isinstance(
            self.backbone, nn.Module) else dataclasses.asdict(self)
        if isinstance(self.backbone, nn.Module):
            out["backbone"] = f"<module {type(self.backbone).__name__}>"
        return out

    def validated(self, source: str | None = None) -> TrainConfig:
        """The config with every value checked against its field type and the cross-field
        rules (``views``, the loss and critic names and keywords); raises :class:`ConfigError`."""
        cfg = validate_fields(TrainConfig, self._fields(), source=source)
        if cfg.views == 1:
            raise ConfigError("views", cfg.views, "0 (supervised) or >= 2 (views per instance)",
                              source=source)
        if cfg.overwrite and cfg.resume is not False:
            raise ConfigError("overwrite", cfg.overwrite,
                              f"false when resume is set (resume={cfg.resume!r} continues the run "
                              "in output, overwrite replaces it); pass one of them", source=source)
        if cfg.epochs is None:
            check_warmup(cfg.warmup_steps, cfg.steps, f"steps={cfg.steps}", source=source)
        elif cfg.steps != _DEFAULT_STEPS:  # both given: steps would be silently ignored
            raise ConfigError("steps", cfg.steps,
                              f"left at its default ({_DEFAULT_STEPS}) when epochs is set: "
                              f"epochs={cfg.epochs} decides the run's length and steps would be "
                              "ignored; pass one of them", source=source)
        check_loss(cfg.loss, cfg.loss_kwargs, cfg.critic, cfg.critic_kwargs, source=source)
        return cfg


# ------------------------------------------------------------------------------ checking

#: ``steps`` when not given (a config with ``epochs`` must leave it so)
_DEFAULT_STEPS = TrainConfig.__dataclass_fields__["steps"].default


def check_warmup(warmup_steps: int, total_steps: int, what: str,
                 source: str | None = None) -> None:
    """:class:`ConfigError` unless ``warmup_steps < total_steps``: a warm-up as long as the run
    never reaches ``lr`` and never applies the schedule. ``what`` says where the total comes
    from (``"steps=100"``, ``"epochs=3 x 1 batches"``)."""
    if warmup_steps >= total_steps:
        raise ConfigError("warmup_steps", warmup_steps,
                          f"fewer than the run's {total_steps} steps ({what}): a warm-up as long "
                          "as the run never reaches lr nor applies the schedule; lower "
                          "warmup_steps or train longer", source=source)


def _expected(errors: list[dict]) -> str:
    """What pydantic's errors for one field say was expected, in plain words."""
    parts = []
    for e in errors:
        msg = str(e.get("msg", ""))
        for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if e.get("type") == "is_instance_of":
            msg = f"an instance of {e.get('ctx', {}).get('class', 'the right class')}"
        if e.get("type") == "none_required":
            continue  # the None of an optional field: say what the value itself should be
        if msg not in parts:
            parts.append(msg)
    return " or ".join(parts) or "a valid value"


def validate_fields(cls: type, data: Mapping[str, Any], source: str | None = None):
    """``cls`` (a dataclass with pydantic-annotated fields) from ``data``, checked by pydantic;
    the first problem becomes a :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError("<top level>", data, "a mapping of field: value", source=source)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(str(key), data[key], f"one of the {cls.__name__} fields",
                              closest(str(key), known), unknown=True, source=source)
    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        errors = exc.errors()
        top = errors[0]["loc"][0] if errors[0]["loc"] else "<top level>"
        same = [e for e in errors if e["loc"] and e["loc"][0] == top]
        path = ".".join(str(p) for p in errors[0]["loc"][:1])
        value = data.get(top, errors[0].get("input"))
        suggestion = None
        literal = next((e for e in same if e["type"] == "literal_error"), None)
        if literal is not None and isinstance(value, str):
            options = [o.strip(" '") for o in
                       str(literal["ctx"]["expected"]).replace(" or ", ", ").split(",")]
            suggestion = closest(value, options)
        raise ConfigError(path, value, _expected(same), suggestion, source=source) from None


_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _constructor_params(factory: Any):
    """The parameter lists of ``factory`` (a function) or of each ``__init__`` along a class's
    MRO, up to ``object``; ``None`` for one whose signature cannot be read."""
    targets = list(inspect.getmro(factory)) if inspect.isclass(factory) else [factory]
    for target in targets:
        fn = target.__init__ if inspect.isclass(target) else target
        if fn is object.__init__:
            return
        try:
            yield target, list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            yield target, None
            return


def _signature_names(factory: Any) -> tuple[list[str], bool]:
    """Keyword names a class (or function) accepts, following ``**kwargs`` up the MRO (PML's
    losses pass theirs to their base classes); ``(names, open_ended)``."""
    names: list[str] = []
    for target, params in _constructor_params(factory):
        if params is None:
            return names, True
        more = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                if p.name not in names:
                    names.append(p.name)
        if not more or not inspect.isclass(factory):
            return names, more and not inspect.isclass(factory)
        if target is nn.Module or target is object:
            break
    return names, False


def _loss_factory(name: str, field_name: str = "loss", source: str | None = None):
    """The class behind a loss name (ours or ``pml:ClassName``), or a :class:`ConfigError`."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(field_name, name, "a loss name", source=source)
    if name.startswith("pml:"):
        from losses.registry import pml_class

        try:
            return pml_class(name[4:])
        except ValueError:
            from losses.registry import pml_names

            raise ConfigError(field_name, name, "a pytorch-metric-learning loss class",
                              ("pml:" + c) if (c := closest(name[4:], pml_names())) else None,
                              source=source) from None
    from losses.registry import LOSSES

    try:
        return LOSSES.get(name).factory
    except ValueError:
        names = LOSSES.available() + sorted(LOSSES.aliases())
        raise ConfigError(field_name, name, f"one of {LOSSES.available()} or pml:<ClassName>",
                          closest(name.strip().lower(), names), source=source) from None


def _critic_factory(name: str, source: str | None = None):
    from .. import critics

    try:
        return critics.CRITICS.get(str(name)).factory
    except ValueError:
        raise ConfigError("critic", name, f"one of {critics.available()}",
                          closest(str(name).lower(), critics.available()),
                          source=source) from None


def _check_kwargs(factory: Any, kwargs: Any, field_name: str, what: str,
                  source: str | None, skip: tuple[str, ...] = ()) -> None:
    if not isinstance(kwargs, Mapping):
        raise ConfigError(field_name, kwargs, "a mapping of keyword: value", source=source)
    names, open_ended = _signature_names(factory)
    names = [n for n in names if n not in skip]
    if open_ended:
        return
    for key, value in kwargs.items():
        if key not in names:
            raise ConfigError(f"{field_name}.{key}", value,
                              f"a keyword of {what} (one of {names})", closest(str(key), names),
                              source=source)


def check_loss(loss: str, loss_kwargs: Mapping[str, Any] | None = None,
               critic: str | None = None, critic_kwargs: Mapping[str, Any] | None = None,
               source: str | None = None) -> None:
    """Check a loss name, its keywords against its constructor, a critic override and its
    keywords against the critic's constructor; raise :class:`ConfigError` on the first
    problem. Nothing is built."""
    factory = _loss_factory(loss, source=source)
    _check_kwargs(factory, loss_kwargs or {}, "loss_kwargs", f"loss {loss!r}", source)
    if critic is not None:
        if loss.startswith("pml:"):
            raise ConfigError("critic", critic, "no critic: pml: losses bring their own "
                              "distance (pass it in loss_kwargs) and take no critic",
                              source=source)
        cfactory = _critic_factory(critic, source=source)
        _check_kwargs(cfactory, critic_kwargs or {}, "critic_kwargs", f"critic {critic!r}",
                      source)
    elif critic_kwargs:
        raise ConfigError("critic_kwargs", dict(critic_kwargs), "empty unless critic is set",
                          source=source)


def resolved_kwargs(factory: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the constructor's defaults (what the object is actually built
    with); a default that is not a plain value is written as its ``repr``."""
    names, _ = _signature_names(factory)
    out: dict[str, Any] = {}
    for _, params in _constructor_params(factory):
        for p in params or ():
            if p.name in names and p.name not in out and p.default is not p.empty:
                out[p.name] = p.default
    out.update(kwargs)
    return {k: _plain(v) for k, v in sorted(out.items())}


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


# ------------------------------------------------------------------------------ files

#: The words YAML 1.1 (PyYAML) reads as booleans besides true / false.
_YAML11_BOOLS = frozenset({"yes", "no", "on", "off"})
_BOOL_TAG = "tag:yaml.org,2002:bool"


class YamlBoolWord(str):
    """A YAML 1.1 boolean word (``yes``, ``no``, ``on``, ``off``, unquoted) as :func:`yaml_load`
    returns it: kept as text, so :func:`refuse_yaml_bool_words` can name the key it stands at."""


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader with the YAML 1.2 booleans: only true / false (any case);
        yes / no / on / off come back as :class:`YamlBoolWord`; and YAML 1.2's floats without
        a dot (``3e-4``)."""

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    # YAML 1.2's floats without a dot (3e-4, 1E5): YAML 1.1, which PyYAML reads, leaves
    # them text, so a loss keyword written so would reach the loss as a string
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver("!yaml11bool",
                                 re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"),
                                 list("yYnNoO"))
    Loader.add_constructor("!yaml11bool",
                           lambda loader, node: YamlBoolWord(loader.construct_scalar(node)))
    return Loader


_LOADER: list = []


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's booleans: ``true`` / ``false`` are booleans; the YAML
    1.1 words ``yes`` / ``no`` / ``on`` / ``off`` are not read as ``True`` / ``False`` (a config
    documents them as errors) but come back as :class:`YamlBoolWord` text, which
    :func:`refuse_yaml_bool_words` refuses; quoted (``"on"``) they are plain text."""
    import yaml

    if not _LOADER:
        _LOADER.append(_yaml_loader())
    return yaml.load(text, Loader=_LOADER[0])  # noqa: S506 - a SafeLoader subclass


def refuse_yaml_bool_words(value: Any, key: str, source: str | None = None) -> None:
    """:class:`ConfigError` naming the key (dotted) of the first :class:`YamlBoolWord` in
    ``value`` (mappings and lists are searched)."""
    if isinstance(value, YamlBoolWord):
        raise ConfigError(key, str(value), f"true or false for a boolean (YAML's {str(value)!r} "
                          "is not read as one here); quote it for the text", source=source)
    if isinstance(value, Mapping):
        for k, v in value.items():
            refuse_yaml_bool_words(v, f"{key}.{k}" if key else str(k), source)
    elif isinstance(value, (list, tuple)):
        for v in value:
            refuse_yaml_bool_words(v, key, source)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file into a dict (by extension). A missing file, a syntax
    error or a top level that is not a mapping raises :class:`UserError` naming the file (and
    the line, where the parser says); a missing file raises ``FileNotFoundError``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml_load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise UserError(f"config file {p}{where}: YAML syntax error: {problem}") from None
            data = {} if data is None else data
        elif suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise UserError(f"config file {p}: TOML syntax error: {exc}") from None
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"config file {p}: JSON syntax error: {exc}") from None
        else:
            raise UserError(f"config file {p} must end in .yaml, .yml, .toml or .json")
    except UnicodeDecodeError as exc:  # pragma: no cover - binary file
        raise UserError(f"config file {p} is not text: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of field: value, got "
                        f"{type(data).__name__}")
    refuse_yaml_bool_words(data, "", source=str(p))
    return data
