"""YAML recipes: the schema (pydantic), loading, ``--set`` overrides and one-line errors.

Relative paths inside a recipe (``model.checkpoint``, ``data.args.path`` /
``data.args.root``) are resolved against the recipe file's folder and may not
leave it; ``out`` is resolved against the working directory.
"""
from __future__ import annotations

from pathlib import Path
import dataclasses
import re
import typing
from decimal import Decimal
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, ValidationError, create_model,
                      field_validator, model_validator)

from ..errors import RecipeError, shorten
from ..pruning.config import DEFAULT_RATES, MEASURED_BY_THE_RUN, PrimeConfig, checked_rates

DATA_PATH_ARGS = ("path", "root")
# Mutable defaults are plain values, not factories: pydantic copies them for each recipe, and the JSON schema
# (``primesvt schema``, ``recipe_fields``) shows them.


def _whole_bytes(value: Any) -> Any:
    """A byte count as written (53976, 53976.0, '50KB', '1.5KiB') as whole bytes; refuses what is not one
    (true / false, 53976.7, '1.0005KB'), where pydantic's ByteSize would read 1 or round down silently."""
    if value is None or isinstance(value, ByteSize):
        return value
    if isinstance(value, bool):
        raise ValueError(f"a byte count is a number, not {str(value).lower()}")
    if isinstance(value, (int, float)):
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d*\.?\d+)\s*([A-Za-z]+)?\s*", value)):
        scalar, unit = match.groups()
        if (unit or "b").lower() not in ByteSize.byte_sizes:
            raise ValueError(f"unknown byte unit {unit!r} (B, KB, KiB, MB, MiB, ...)")
        exact = Decimal(scalar) * Decimal(str(ByteSize.byte_sizes[(unit or "b").lower()]))
    else:
        raise ValueError(f"a byte count is a number or a size such as '50KB' or '50KiB', got {shorten(repr(value), 60)}")
    if exact <= 0:
        raise ValueError(f"a byte count is positive, got {shorten(str(value), 60)}")
    if exact != exact.to_integral_value():
        raise ValueError(f"{shorten(str(value), 60)} is {exact} bytes: a byte count is a whole number of bytes")
    return int(exact)


Bytes = Annotated[ByteSize, BeforeValidator(_whole_bytes)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name: str = Field(description="registered builder (e.g. spikformer) or 'package.module:function'")
    args: dict[str, Any] = Field({})
    checkpoint: Path | None = Field(None, description="weights of the unpruned model: a state dict, or a training "
                                                      "checkpoint holding one under state_dict, model or module "
                                                      "(timm's, MAE's); a 'module.' prefix is removed")
    output: int | None = Field(None, ge=0, description="a model returning a tuple: the index of the output tensor "
                                                       "(the class scores); default: its first tensor")


class DataSection(Section):
    name: str = "digits"
    args: dict[str, Any] = Field({})
    val_subset: int | None = Field(None, gt=0, description="validation samples the pruning policy evaluates on")
    batch_size: int = Field(128, gt=0)
    workers: int = Field(0, ge=0, description="DataLoader worker processes reading the data")


class ScheduleFields(Section):
    """The learning-rate schedule shared by ``train`` and ``finetune`` (per optimizer step)."""

    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="after the warm-up: cosine decay to 0 at the last step (what training always did), "
                              "or a constant rate")
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear warm-up to the full rate, before the schedule")

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        epochs = getattr(self, "epochs", 0)
        if epochs and self.warmup_epochs > epochs:  # epochs 0 switches training off: any warm-up is moot
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) is longer than epochs ({epochs})")
        return self


class TrainSection(ScheduleFields):
    epochs: int = Field(10, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    amp: bool = Field(False, description="mixed precision (float16 autocast) when training on CUDA; "
                                         "ignored on the CPU")


class _PruneSectionBase(Section):
    """The ``prune`` section: the method, and (generated below from ``PrimeConfig``) the policy's options."""

    method: Literal["prime", "uniform"] = "prime"
    ratio: float = Field(0.3, ge=0, lt=1, description="uniform method: ratio of every group")
    importance: str = Field("l2", description="the importance criterion ranking channels within a group: l2, l1, "
                                               "taylor, random, memory, or a plugin's")
    importance_args: dict[str, Any] = Field({}, description="keyword arguments of the importance "
                                                                              "factory (e.g. {memory_weight: 0.5})")

    # Validators raise ValueError because pydantic expects it (ArgumentError is one): it becomes a
    # ValidationError, which load_recipe reports as a RecipeError naming the file and the field. What PrimeConfig
    # checks is checked by building one (in this order: after the budgets replaced the default saving).
    @model_validator(mode="after")
    def _budgets_replace_the_default_saving(self) -> "_PruneSectionBase":
        # memory_saving has a default (the paper's 26.68%); budgets given without it are the only target
        budgets = self.flash_budget or self.ram_budget
        if budgets and self.method != "prime":
            raise ValueError("flash_budget and ram_budget are targets of the prime method's search; "
                             "use method: prime (uniform prunes a fixed ratio)")
        if budgets and "memory_saving" not in self.model_fields_set:
            self.memory_saving = 0.0
        return self

    @model_validator(mode="after")
    def _makes_a_prime_config(self) -> "_PruneSectionBase":
        # the rest of what PrimeConfig checks (a target given, ...), before any training rather than at pruning
        if self.method == "prime":
            self.to_config()
        return self

    @field_validator("rates", check_fields=False)
    @classmethod
    def _rates_are_fractions(cls, rates: list[float]) -> list[float]:
        checked_rates(rates)
        return rates

    def to_config(self, **objects) -> PrimeConfig:
        """The ``PrimeConfig`` of this section: its fields of the same names, plus ``objects`` (the deployment and
        the chance level, which the run measures)."""
        values = {option.name: getattr(self, option.name) for option in _prime_options()}
        return PrimeConfig(**{**values, **objects})  # PrimeConfig makes the rates a sorted tuple


# What a YAML file writes differently from PrimeConfig's declaration of an option: the paper's saving and a 2-point
# drop as defaults, accuracies as fractions, byte sizes as strings ('50KB'), lists.
_YAML_FACE: dict[str, dict[str, Any]] = {
    "memory_saving": {"default": 0.2668},
    "max_accuracy_drop": {"default": 0.02, "le": 1},
    "min_accuracy": {"ge": 0, "le": 1},
    "flash_budget": {"annotation": Bytes | None},
    "ram_budget": {"annotation": Bytes | None},
    "rates": {"annotation": list[float], "default": list(DEFAULT_RATES)},
}


def _prime_options() -> list[dataclasses.Field]:
    return [option for option in dataclasses.fields(PrimeConfig) if option.name not in MEASURED_BY_THE_RUN]


def _prune_option_fields() -> dict[str, tuple[Any, Any]]:
    """``PrimeConfig``'s options as pydantic fields: type, default, description and range as declared there, with
    ``_YAML_FACE`` on top."""
    types = typing.get_type_hints(PrimeConfig)
    fields = {}
    for option in _prime_options():
        face = dict(_YAML_FACE.get(option.name, {}))
        annotation, default = face.pop("annotation", types[option.name]), face.pop("default", option.default)
        bounds = {**option.metadata["bounds"], **face}
        fields[option.name] = (annotation, Field(default, description=option.metadata["description"], **bounds))
    return fields


PruneSection = create_model("PruneSection", __base__=_PruneSectionBase, __module__=__name__,
                            **_prune_option_fields())


class DistillSection(Section):
    weight: float = Field(0.5, ge=0, le=1, description="share of the teacher's term in the loss (1 - weight: "
                                                       "cross-entropy with the labels)")
    temperature: float = Field(4.0, gt=0, description="softens both models' class scores before comparing them")


class FinetuneSection(ScheduleFields):
    epochs: int = Field(2, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, gt=0)
    distill: DistillSection | None = Field(None, description="knowledge distillation from the unpruned model "
                                                             "(null: cross-entropy only)")


class QuantizeSection(Section):
    method: str = "nncf_int8"
    calibration_size: int = Field(300, gt=0)
    args: dict[str, Any] = Field({})
    max_weight_fraction: float = Field(0.25, gt=0, description="check: the quantized weights of a pruned model are "
                                                               "at most this fraction of the unpruned FP32 parameters")
    max_accuracy_drop: float = Field(0.03, ge=0, description="check: the quantized model's test accuracy is at most "
                                                             "this far below the unpruned FP32 model's")


class ExportSection(Section):
    formats: list[str] = Field(["onnx", "openvino"])
    inference_precision: Literal["f32", "bf16", "f16"] = Field(
        "f32", description="precision OpenVINO computes the floating-point operations in, for the export checks "
                           "and the INT8 model's evaluation; f32 unless the target runs bf16/f16 (spikes may flip)")
    min_agreement: float = Field(0.995, gt=0, le=1, description="top-1 agreement with the PyTorch model an "
                                                                 "export needs on the test samples to be written")
    min_int8_agreement: float = Field(0.95, gt=0, le=1, description="the same for exports quantized on the way "
                                                                     "(onnx_int8): 8-bit rounding flips some spikes")
    verify_samples: int = Field(1000, gt=0, description="test samples exports are verified on (at most)")


class Recipe(Section):
    seed: int = Field(0, ge=0, lt=2**32, description="seeds data splits, training and the search")
    out: Path = Path("runs/out")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model trains, is pruned and "
                                                                       "evaluated; auto: cuda when torch sees a GPU")
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection | None = None
    prune: PruneSection | None = None
    finetune: FinetuneSection | None = None
    quantize: QuantizeSection | None = None
    export: ExportSection | None = None
    source: Path | None = Field(None, exclude=True, description="the recipe file (set by load_recipe)")

    @model_validator(mode="after")
    def _has_work(self) -> "Recipe":
        if not (self.prune or self.quantize or self.export or self.train):
            raise ValueError("recipe has nothing to do: add at least one of train, prune, quantize, export")
        return self

    def resolve(self, path: Path | str, field: str) -> Path:
        """``path`` from the recipe, resolved against the recipe's folder; refuses to leave it."""
        path = Path(path)
        if path.is_absolute() or self.source is None:
            return path
        base = self.source.parent.resolve()
        resolved = (base / path).resolve()
        if not resolved.is_relative_to(base):
            raise RecipeError(f"{self.source}: {field}: relative path {str(path)!r} leaves the recipe's "
                              f"folder {base}; use an absolute path")
        return resolved

    def input_files(self) -> dict[str, Path]:
        """The files the recipe reads, by field, resolved (see ``resolve``)."""
        fields = {"model.checkpoint": self.model.checkpoint}
        fields.update({f"data.args.{key}": self.data.args.get(key) for key in DATA_PATH_ARGS})
        return {field: self.resolve(path, field) for field, path in fields.items() if path is not None}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a recipe dict."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. prune.memory_saving=0.3")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # absent, or switched off with 'section: null'
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise RecipeError(f"--set {override!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {override!r}: the value is not valid YAML: "
                              f"{getattr(error, 'problem', None) or error}") from None
    return data


def _field_path(error: dict) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


SHIPPED = Path(__file__).parent.parent / "recipes"  # package data: installed with the wheel


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped with primesvt, by name (``spikformer_digits``, ...)."""
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path given, or the shipped recipe of that name when no such file exists."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = shipped_recipes()
    if path.name not in shipped:
        raise RecipeError(f"{name_or_path}: no such recipe file, and primesvt ships no recipe of that name "
                          f"(shipped: {', '.join(shipped)})")
    return shipped[path.name]


# A recipe is a few dozen values; YAML aliases can make a small file expand to billions ("billion laughs"),
# which every later step (validation, reports, error messages) would walk.
MAX_RECIPE_VALUES = 100_000


def _exceeds(data: Any, limit: int) -> bool:
    """Whether ``data``, with every alias expanded, holds more than ``limit`` values (stops counting there)."""
    pending, seen = [data], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value
    return False


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; errors are one line naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise RecipeError(f"{path}:{line} not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    if _exceeds(data, MAX_RECIPE_VALUES):
        raise RecipeError(f"{path}: the recipe expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases "
                          "repeating aliases?); write the values out, or use fewer aliases")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise RecipeError(f"{path}: {_field_path(first)}: {first['msg']}{more}") from None
    recipe.source = path.resolve()
    recipe.input_files()  # refuses paths leaving the recipe's folder now, not mid-run
    return recipe


REQUIRED = "required"  # what ``recipe_fields`` gives for a field with no default


def recipe_fields(schema: dict | None = None) -> dict[str, Any]:
    """Every field a recipe file may hold, by dotted path (``prune.flash_budget``), with its default (``REQUIRED``
    when it has none), read from ``Recipe.model_json_schema()``: what ``primesvt schema`` prints and what
    docs/recipes.md's field table is checked against."""
    schema = schema or Recipe.model_json_schema()
    definitions = schema.get("$defs", {})

    def section(node: dict) -> dict | None:  # the section a property holds ($ref, or anyOf [$ref, null])
        for option in [node, *node.get("anyOf", [])]:
            if "$ref" in option:
                return definitions[option["$ref"].rpartition("/")[2]]
        return None

    def walk(node: dict, prefix: str) -> dict[str, Any]:
        fields = {}
        required = set(node.get("required", ()))
        for name, prop in node.get("properties", {}).items():
            if name == "source":  # set by load_recipe, never read from the file
                continue
            inner = section(prop)
            if inner is not None:
                fields.update(walk(inner, f"{prefix}{name}."))
            else:
                fields[prefix + name] = REQUIRED if name in required else prop["default"]
        return fields

    return walk(schema, "")
