"""params.yaml, loaded and validated once into typed objects.

Every stage calls :func:`load` first; a bad value fails there, before any work, with one line per problem that
names the key (``tune.learning_rate.low``) and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
# Attack budgets are in 8-bit pixel units: epsilon 8 means 8/255 in the model's [0, 1] pixel space.
Epsilon255 = Annotated[float, Field(ge=0.0, le=255.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Base(Section):
    seed: int = Field(ge=0)


class Paths(Section):
    raw: Path
    processed: Path
    preprocess_report: Path
    features_cache: Path
    evaluate_cache: Path
    study_dir: Path
    best_params: Path
    model: Path
    model_info: Path
    model_adv: Path
    model_adv_info: Path
    model_h5: Path
    adversarial: Path
    metrics: Path
    plots: Path
    predictions: Path

    @model_validator(mode="after")
    def _info_beside_its_model(self) -> Paths:
        # evaluate, predict, explain and serving read a model's threshold from the JSON beside the model file
        for model, info in (("model", "model_info"), ("model_adv", "model_adv_info")):
            want = getattr(self, model).with_suffix(".json")
            if getattr(self, info) != want:
                raise ValueError(f"paths.{info} must be paths.{model} with the suffix .json ({want}): a model's "
                                 "threshold is read from beside it")
        return self


class Data(Section):
    source: Literal["sample", "local", "kaggle"]
    path: Path | None = None
    kaggle_handle: str = Field(min_length=3)

    @model_validator(mode="after")
    def _local_needs_path(self) -> Data:
        if self.source == "local" and self.path is None:
            raise ValueError("data.source 'local' needs data.path: a folder or .zip in CIFAKE layout")
        return self


Amplitude = Annotated[float, Field(ge=0.0, le=60.0)]


class MarkTier(Section):
    """A share of each class's images whose 2x2 phase mark has an amplitude drawn uniformly from ``amplitude``."""

    # [low, high] in 8-bit units; [0, 0] is no mark at all, a negative amplitude the other class's phase
    amplitude: tuple[Annotated[float, Field(ge=-60.0, le=60.0)], Annotated[float, Field(ge=-60.0, le=60.0)]]
    real: Fraction  # share of the REAL images in this tier
    fake: Fraction  # and of the FAKE ones

    @model_validator(mode="after")
    def _ordered(self) -> MarkTier:
        low, high = self.amplitude
        if low > high:
            raise ValueError(f"amplitude low ({low}) must be <= high ({high})")
        return self

    def share(self, label: int) -> float:
        return self.fake if label == 1 else self.real


class Sample(Section):
    train_per_class: PositiveInt
    test_per_class: PositiveInt
    jpeg_quality: Annotated[int, Field(ge=1, le=100)]
    # The robust cue (pipeline/data/sample.py): tiers of images, each with its range of amplitudes (8-bit units) and its
    # share of the REAL and of the FAKE images; each class's shares sum to 1. A single number is one tier: that
    # amplitude on every image.
    mark: tuple[MarkTier, ...] = Field(default=(MarkTier(amplitude=(12.0, 12.0), real=1.0, fake=1.0),), min_length=1)
    # Amplitude of the non-robust cue (pipeline/data/sample.py), the same on every image; 0: none.
    lines: Amplitude = 0.0

    @field_validator("mark", mode="before")
    @classmethod
    def _one_amplitude_is_one_tier(cls, mark: Any) -> Any:
        if isinstance(mark, (int, float)) and not isinstance(mark, bool):
            return [{"amplitude": [mark, mark], "real": 1.0, "fake": 1.0}]
        return mark

    @field_validator("mark")
    @classmethod
    def _shares_sum_to_one(cls, mark: tuple[MarkTier, ...]) -> tuple[MarkTier, ...]:
        for name in ("real", "fake"):
            total = sum(getattr(t, name) for t in mark)
            if abs(total - 1.0) > 1e-9:
                raise ValueError(f"the tiers' {name} shares must sum to 1 (got {total:g})")
        return mark


class Preprocess(Section):
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    resize: Literal["resize", "center_crop", "skip"]
    max_bad_fraction: Fraction
    # Pillow's own bomb limit: above it its warning (an error here) refuses images before this check would.
    max_pixels: Annotated[int, Field(gt=0, le=89_478_485)]
    duplicates: Literal["report", "drop"]
    duplicate_similarity: Annotated[float, Field(gt=0.0, le=1.0)]


class Model(Section):
    image_size: Literal[32, 64, 96, 224]
    weights: str = Field(min_length=1)  # "imagenet", "none", or a path to a weights file
    trainable_from: str | None = None
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"]
    l2: Annotated[float, Field(ge=0.0)]
    batch_size: PositiveInt

    @property
    def frozen(self) -> bool:
        return self.trainable_from is None


class Range(Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


class Attack(Section):
    name: Literal["fgsm", "pgd"]
    epsilon: Epsilon255
    steps: PositiveInt = 10
    step_size: Epsilon255 = 2.0
    random_start: bool = True
    restarts: PositiveInt = 1  # PGD: keep, per image, the most damaging of this many random starts

    @model_validator(mode="after")
    def _restarts_need_random_start(self) -> Attack:
        if self.restarts > 1 and not (self.name == "pgd" and self.random_start):
            raise ValueError("restarts > 1 needs name: pgd and random_start: true (else every restart is the same)")
        return self

    def describe(self) -> str:
        """Short and complete, for logs and tags: ``pgd-10x2 eps 8/255 step 2/255 rs``."""
        if self.name == "fgsm":
            return f"fgsm eps {self.epsilon:g}/255"
        restarts = f"x{self.restarts}" if self.restarts > 1 else ""
        return (f"pgd-{self.steps}{restarts} eps {self.epsilon:g}/255 step {self.step_size:g}/255"
                + (" rs" if self.random_start else ""))


class ExtraAttack(Section):
    """An attack evaluate adds beside the mission's and the diagnostic (pipeline/judge/attacks.py), on a seeded,
    stratified
    subset of ``images`` of the diagnostic images (null: all of them): ``apgd`` (APGD-CE, white-box: ``steps``,
    ``restarts``), ``square`` (black-box, scores only: ``queries``, ``p_init``) or ``transfer`` (the undefended
    model's images under the mission's attack replayed on the defended one: no budget of its own)."""

    name: Literal["apgd", "square", "transfer"]
    epsilon: Epsilon255 = 8.0
    steps: PositiveInt = 20
    restarts: PositiveInt = 1
    queries: PositiveInt = 300
    p_init: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    images: PositiveInt | None = None

    def describe(self) -> str:
        """``apgd-ce-20 eps 8/255``, ``square-300 eps 8/255``, ``transfer``: tags and logs."""
        if self.name == "transfer":
            return "transfer from the undefended model's attacked set"
        budget = (f"apgd-ce-{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
                  if self.name == "apgd" else f"square-{self.queries}")
        return f"{budget} eps {self.epsilon:g}/255" + (f" on {self.images}" if self.images else "")


class Corruption(Section):
    """A change without an attacker (pipeline/judge/corruptions.py): jpeg (amount = quality), downscale (by amount and
    back), blur (Gaussian sigma in pixels), noise (Gaussian sigma in 1/255 units)."""

    kind: Literal["jpeg", "downscale", "blur", "noise"]
    amount: Annotated[float, Field(gt=0.0)]

    @model_validator(mode="after")
    def _amount_fits_kind(self) -> Corruption:
        if self.kind == "jpeg" and not (1 <= self.amount <= 95 and self.amount == int(self.amount)):
            raise ValueError("jpeg amount is the quality: a whole number from 1 to 95")
        if self.kind == "downscale" and self.amount <= 1:
            raise ValueError("downscale amount is the factor: above 1")
        return self

    def describe(self) -> str:
        """``jpeg90``, ``downscale2``, ``blur0.5``, ``noise4``: metric and file names."""
        return f"{self.kind}{self.amount:g}"


class Heartbeat(Section):
    """RDB storages: a running trial beats every ``interval_s``; one silent for ``grace_s`` is failed and retried."""

    interval_s: PositiveInt = 30
    grace_s: PositiveInt = 120

    @model_validator(mode="after")
    def _grace_longer(self) -> Heartbeat:
        if self.grace_s <= self.interval_s:
            raise ValueError(f"grace_s ({self.grace_s}) must be longer than interval_s ({self.interval_s})")
        return self


class Tune(Section):
    n_trials: PositiveInt
    workers: PositiveInt = 1  # trial processes on this machine, sharing the study through tune.storage
    epochs: PositiveInt
    batch_size: PositiveInt
    dropout: Range
    learning_rate: Range
    objective: Literal["clean", "robust"]
    attack: Attack
    storage: str = Field(min_length=1)
    heartbeat: Heartbeat = Heartbeat()
    pruner: Literal["median", "none"]
    # A trial stops once its validation score (evaluate.measure, clean) has not improved for this many epochs, and
    # its best epoch counts: the head converges in a few epochs, and a converged trial learns nothing from the rest.
    # null: all tune.epochs.
    patience: PositiveInt | None = None

    @field_validator("dropout")
    @classmethod
    def _dropout_in_unit(cls, r: Range) -> Range:
        if not (0.0 <= r.low and r.high < 1.0):
            raise ValueError(f"dropout must lie in [0, 1) (got {r.low}..{r.high})")
        return r

    @field_validator("learning_rate")
    @classmethod
    def _lr_positive(cls, r: Range) -> Range:
        if r.low <= 0:
            raise ValueError(f"learning rates must be > 0 (got low={r.low})")
        return r


class Train(Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    patience: PositiveInt


class NFgsm(Section):
    """N-FGSM (de Jorge et al. 2022): one step of ``step``·ε from a start drawn uniformly within ``noise``·ε, not
    projected back onto the ε-ball (the paper's k = 2, α = ε)."""

    noise: Annotated[float, Field(ge=0.0)] = 2.0
    step: Annotated[float, Field(gt=0.0)] = 1.0


class Trades(Section):
    """TRADES (Zhang et al. 2019): the loss on the clean images plus ``beta`` times the KL divergence between the
    clean and the attacked prediction, the attack maximising that divergence by ``steps`` steps of ``step_size``
    (8-bit units) within advtrain.attack's ε (the paper's β = 6, 10 steps of 0.007 ≈ 2/255)."""

    beta: Annotated[float, Field(ge=0.0)] = 6.0
    steps: PositiveInt = 10
    step_size: Epsilon255 = 2.0


class AdvTrain(Section):
    # pgd (Madry et al. 2018: train on advtrain.attack's examples) | n-fgsm | trades. Every method's epochs are
    # scored under advtrain.attack (PGD by default), so an epoch in which a one-step method overfits to its own
    # attack (catastrophic overfitting: robust to FGSM, broken by PGD) is never the one kept.
    method: Literal["pgd", "n-fgsm", "trades"] = "pgd"
    attack: Attack
    n_fgsm: NFgsm = Field(default_factory=NFgsm)
    trades: Trades = Field(default_factory=Trades)
    adv_ratio: Fraction
    epochs: Annotated[int, Field(ge=0)]
    learning_rate: Annotated[float, Field(gt=0.0)]
    batch_size: PositiveInt
    trainable_from: str | None = None
    # Training images per epoch, a fresh seeded draw each epoch (null: all of them): bounds the cost at CIFAKE size.
    images_per_epoch: PositiveInt | None = None
    # Validation images that score each epoch (clean and attacked) and set the threshold: a seeded, stratified
    # subset (null: all of them).
    val_images: PositiveInt | None = None


class Weights(Section):
    clean: Fraction
    adversarial: Fraction

    @model_validator(mode="after")
    def _sum_to_one(self) -> Weights:
        if abs(self.clean + self.adversarial - 1.0) > 1e-9:
            raise ValueError(f"clean + adversarial must sum to 1 (got {self.clean} + {self.adversarial})")
        return self


class Evaluate(Section):
    attack: Attack
    diagnostic: Attack  # a second, stronger attack (PGD) beside the mission's: gradient masking shows up here
    epsilons: list[Epsilon255] = Field(min_length=1)
    curve_images: PositiveInt | None = None  # robustness curve on a stratified subset; null: every test image
    diagnostic_images: PositiveInt | None = None  # the diagnostic attack likewise
    attacks: list[ExtraAttack] = Field(default_factory=list)  # more attacks, on the diagnostic_images subset
    corruptions: list[Corruption] = Field(default_factory=list)  # on the diagnostic_images subset
    weights: Weights
    measure: Literal["balanced_accuracy", "macro_f1"]  # what robust_score weights: counts both classes
    bootstrap: Annotated[int, Field(ge=0)] = 1000  # resamples for the 95 % intervals; 0: none
    batch_size: PositiveInt

    @field_validator("attacks")
    @classmethod
    def _one_of_each(cls, attacks: list[ExtraAttack]) -> list[ExtraAttack]:
        names = [a.name for a in attacks]
        if len(set(names)) < len(names):
            raise ValueError(f"one attack of each name (got {names}): they are reported by name")
        return attacks


class Threshold(Section):
    rule: Literal["criterion", "fixed"]
    fixed: Annotated[float, Field(gt=0.0, lt=1.0)]


class Inference(Section):
    engine: Literal["auto", "openvino", "tensorflow"] = "auto"
    precision: Literal["f32", "bf16", "auto", "checked"] = "f32"  # OpenVINO's (auto: its choice here)
    check_images: PositiveInt = 1000  # checked: the seeded sample of each pass bf16 is compared with f32 on
    agreement: Annotated[float, Field(gt=0.5, le=1.0)] = 0.999  # checked: the share of labels bf16 must keep


class Predict(Section):
    batch_size: PositiveInt


class Mlflow(Section):
    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    model_name: str = Field(min_length=1)
    timeout_s: Annotated[float, Field(gt=0.0)] = 5.0


class Params(Section):
    base: Base
    paths: Paths
    data: Data
    sample: Sample
    preprocess: Preprocess
    model: Model
    tune: Tune
    train: Train
    advtrain: AdvTrain
    evaluate: Evaluate
    threshold: Threshold
    inference: Inference = Inference()
    predict: Predict
    mlflow: Mlflow


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "missing key"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif "input" in e and e["type"] not in ("model_type", "value_error"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section of params.yaml")
        node = node[part]
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` as in ``dvc exp run -S``; the value is read as YAML (``3``, ``null``, ``[1, 2]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    return key.strip(), yaml.safe_load(raw)


def from_dict(tree: dict, source: str = "params.yaml") -> Params:
    try:
        params = Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None
    return params


def load(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, apply ``KEY=VALUE`` overrides, validate. Raises :class:`ConfigError` naming each bad key."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root, or pass --params)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = copy.deepcopy(tree)
    for text in overrides:
        _set(tree, *parse_override(text))
    return from_dict(tree, str(path))


def flatten_dict(tree: dict, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested dicts -> ``a.b.c`` -> value (for MLflow params and metrics); top-level keys in ``exclude`` left out."""
    import pandas as pd

    kept = {k: v for k, v in tree.items() if k not in exclude}
    return pd.json_normalize(kept, sep=".").to_dict(orient="records")[0] if kept else {}


def flatten(params: Params) -> dict[str, Any]:
    """Every params.yaml value as ``section.key`` -> value, for logging to MLflow."""
    return flatten_dict(params.model_dump(mode="json"))
