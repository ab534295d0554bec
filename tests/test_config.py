"""pipeline.config: params.yaml loads, each bad value names its key, overrides, and dvc.yaml agrees with it."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"


@pytest.fixture
def tree() -> dict:
    return yaml.safe_load(PARAMS_FILE.read_text())


def set_key(tree: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(tree)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def test_default_params_load() -> None:
    p = config.load(PARAMS_FILE)
    assert p.data.source == "sample"
    assert p.model.image_size == 32 and p.model.frozen
    assert p.evaluate.weights.clean + p.evaluate.weights.adversarial == pytest.approx(1.0)
    assert p.tune.learning_rate.log and p.tune.learning_rate.low < p.tune.learning_rate.high


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("advtrain.learning_rate", -0.001, "advtrain.learning_rate"),
        ("tune.learning_rate.low", -1e-5, "tune.learning_rate"),
        ("data.source", "dropbox", "data.source"),
        ("tune.dropout.low", 0.6, "tune.dropout"),  # low > high (0.5)
        ("train.epochs", "many", "train.epochs"),  # wrong type
        ("base.seed", [1], "base.seed"),
        ("model.image_size", 48, "model.image_size"),
        ("tune.dropout.high", 1.0, "tune.dropout"),  # dropout must be < 1
        ("tune.attack.epsilon", 256, "tune.attack.epsilon"),
        ("evaluate.attack.epsilon", 300, "evaluate.attack.epsilon"),
        ("threshold.fixed", 1.5, "threshold.fixed"),
        ("mlflow.timeout_s", 0, "mlflow.timeout_s"),
    ],
)
def test_invalid_value_names_its_key(tree: dict, key: str, value, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_dict(set_key(tree, key, value))
    assert f"{named}:" in str(err.value)


def test_mark_tiers_and_the_one_number_form(tree: dict) -> None:
    # one number is one tier holding every image (the easy sample); tiers need each class's shares to sum to 1
    assert config.from_dict(set_key(tree, "sample.mark", 12)).sample.mark == (
        config.MarkTier(amplitude=(12.0, 12.0), real=1.0, fake=1.0),)
    half = [{"amplitude": [0, 0], "real": 0.5, "fake": 0.5}, {"amplitude": [10, 14], "real": 0.5, "fake": 0.4}]
    with pytest.raises(ConfigError, match=r"sample\.mark: the tiers' fake shares must sum to 1 \(got 0\.9\)"):
        config.from_dict(set_key(tree, "sample.mark", half))
    with pytest.raises(ConfigError, match=r"sample\.mark\.0: amplitude low \(6\.0\) must be <= high \(2\.0\)"):
        config.from_dict(set_key(tree, "sample.mark", [{"amplitude": [6, 2], "real": 1, "fake": 1}]))
    with pytest.raises(ConfigError, match=r"sample\.mark\.0\.amplitude\.1: .*less than or equal to 60"):
        config.from_dict(set_key(tree, "sample.mark", [{"amplitude": [0, 99], "real": 1, "fake": 1}]))


def test_range_with_low_above_high_says_so(tree: dict) -> None:
    with pytest.raises(ConfigError, match=r"tune\.learning_rate.*low .* must be <= high"):
        config.from_dict(set_key(tree, "tune.learning_rate.low", 0.1))


def test_dropout_of_one_or_more_is_refused(tree: dict) -> None:
    bad = set_key(set_key(tree, "tune.dropout.low", 0.5), "tune.dropout.high", 1.2)
    with pytest.raises(ConfigError, match=r"tune\.dropout.*\[0, 1\)"):
        config.from_dict(bad)


def test_missing_key_is_named(tree: dict) -> None:
    del tree["train"]["patience"]
    with pytest.raises(ConfigError, match=r"train\.patience: missing key"):
        config.from_dict(tree)


def test_missing_section_is_named(tree: dict) -> None:
    del tree["predict"]
    with pytest.raises(ConfigError, match=r"predict: missing key"):
        config.from_dict(tree)


def test_unknown_key_is_called_a_typo(tree: dict) -> None:
    tree["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \(typo\?\)"):
        config.from_dict(tree)


def test_wrong_type_names_key_and_value(tree: dict) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*'lots'"):
        config.from_dict(set_key(tree, "train.batch_size", "lots"))


def test_evaluate_weights_must_sum_to_one(tree: dict) -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.weights.*sum to 1"):
        config.from_dict(set_key(tree, "evaluate.weights", {"clean": 0.5, "adversarial": 0.6}))


def test_epsilon_above_255_is_refused(tree: dict) -> None:
    with pytest.raises(ConfigError, match=r"advtrain\.attack\.epsilon"):
        config.from_dict(set_key(tree, "advtrain.attack.epsilon", 256))


def test_local_source_needs_a_path(tree: dict) -> None:
    with pytest.raises(ConfigError, match=r"data.*'local' needs data\.path"):
        config.from_dict(set_key(tree, "data.source", "local"))
    ok = config.from_dict(set_key(set_key(tree, "data.source", "local"), "data.path", "cifake.zip"))
    assert ok.data.path == Path("cifake.zip")


def test_every_problem_is_reported_at_once(tree: dict) -> None:
    bad = set_key(set_key(tree, "train.epochs", 0), "predict.batch_size", -1)
    with pytest.raises(ConfigError) as err:
        config.from_dict(bad)
    assert "train.epochs" in str(err.value) and "predict.batch_size" in str(err.value)


def test_overrides_apply_and_are_typed() -> None:
    p = config.load(PARAMS_FILE, ["train.epochs=3", "model.trainable_from=conv5_block3_1_conv",
                                  "evaluate.epsilons=[0, 4]", "data.path=null"])
    assert p.train.epochs == 3
    assert p.model.trainable_from == "conv5_block3_1_conv" and not p.model.frozen
    assert p.evaluate.epsilons == [0, 4]
    assert config.load(PARAMS_FILE).train.epochs == yaml.safe_load(PARAMS_FILE.read_text())["train"]["epochs"]


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.epochs=-2", "train.epochs"), ("train.epochz=3", "train.epochz"), ("tune.storage.url=x", "tune.storage"),
     ("nosuch.key=1", "nosuch")],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(PARAMS_FILE, [override])
    assert key in str(err.value)


def test_override_without_equals_sign_is_explained() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.load(PARAMS_FILE, ["train.epochs"])


def test_missing_or_broken_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


def test_flatten_gives_dotted_keys() -> None:
    flat = config.flatten(config.load(PARAMS_FILE))
    assert flat["train.epochs"] == yaml.safe_load(PARAMS_FILE.read_text())["train"]["epochs"]
    assert flat["tune.learning_rate.low"] == pytest.approx(1e-5)
    assert flat["evaluate.weights.adversarial"] == pytest.approx(0.6)
    assert flat["model.trainable_from"] is None
    assert flat["paths.model"] == "models/model.keras"
    assert all(isinstance(k, str) and "." in k for k in flat)
    assert not any(isinstance(v, dict) for v in flat.values())


def test_flatten_dict_excludes_top_level_keys() -> None:
    assert config.flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "skip": {"x": 1}}, exclude=("skip",)) == {
        "a.b": 1, "a.c.d": 2}


# ---------------------------------------------------------------------------------------- dvc.yaml vs params


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _resolves(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_dvc_stage_params_exist_in_params_yaml() -> None:
    tree = yaml.safe_load(PARAMS_FILE.read_text())
    missing = []
    for name, stage in _dvc()["stages"].items():
        for entry in stage.get("params", []):
            # An entry is a key of params.yaml, or {other_file: [keys]} (none are used here: check all the same).
            keys = [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
            missing += [f"{name}: {k}" for k in keys if not _resolves(tree, k)]
    assert not missing, f"dvc.yaml lists params that params.yaml lacks: {missing}"


def test_dvc_path_templates_name_existing_paths() -> None:
    tree = yaml.safe_load(PARAMS_FILE.read_text())
    templates = re.findall(r"\$\{\s*([^}]+?)\s*\}", (ROOT / "dvc.yaml").read_text())
    assert templates, "dvc.yaml uses ${paths.*} templates"
    unknown = sorted({t for t in templates if not t.startswith("paths.") or not _resolves(tree, t)})
    assert not unknown, f"dvc.yaml templates name no params.yaml paths key: {unknown}"


def test_a_models_info_file_lives_beside_it(tree: dict) -> None:
    # evaluate and predict read a model's threshold from the JSON beside it: one elsewhere would be silently unread
    with pytest.raises(ConfigError, match=r"paths\.model_adv_info must be paths\.model_adv with the suffix \.json"):
        config.from_dict(set_key(tree, "paths.model_adv_info", "elsewhere/model_adv.json"))
    moved = set_key(set_key(tree, "paths.model", "out/m.keras"), "paths.model_info", "out/m.json")
    assert config.from_dict(moved).paths.model_info == Path("out/m.json")
