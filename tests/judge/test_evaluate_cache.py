"""evaluate's pass cache (pipeline/judge/cache.py): a rerun on the same weights and images reads every pass back and
computes no forward pass, gives the same figures, recomputes exactly the pass whose settings changed, and never
reads another model's, other images' or a damaged entry."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import config
from pipeline.judge import cache, evaluation
from pipeline.judge.attacks import Attacker, to_uint8
from pipeline.model import inference
from tests.conftest import PARAMS_FILE, SEED, cue_images

TF = config.Inference(engine="tensorflow")
PASSES = ["clean", "signs", "attack", "diagnostic", "apgd", "square", "transfer", "corruption", "curve", "curve"]


def protocol(**more: str) -> config.Evaluate:
    overrides = {"evaluate.diagnostic_images": "null", "evaluate.curve_images": "16",
                 "evaluate.epsilons": "[0, 2, 4, 8]", "evaluate.bootstrap": "50", "evaluate.diagnostic.steps": "3",
                 "evaluate.corruptions": "[{kind: jpeg, amount: 75}]",
                 "evaluate.attacks": "[{name: apgd, steps: 3}, {name: square, queries: 10}, {name: transfer}]", **more}
    return config.load(PARAMS_FILE, [f"{k}={v}" for k, v in overrides.items()]).evaluate


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    return cue_images(12, seed=5)


@pytest.fixture(scope="module")
def source(graded_model, test_set) -> np.ndarray:
    """The transfer attack's images (in evaluate, the undefended model's diagnostic images)."""
    return to_uint8(Attacker(graded_model.model, protocol().diagnostic, SEED).perturb(*test_set, 64))


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """How many images went through the model's forward passes (attacks' gradients aside)."""
    calls, real = [], inference.runner

    def counting(model, engine):
        run = real(model, engine)
        return lambda images, *a, **k: (calls.append(len(images)), run(images, *a, **k))[1]

    monkeypatch.setattr(inference, "runner", counting)
    return calls


def run(model, test_set, cache_dir, cfg, source=None):
    return evaluation.run_protocol(model, *test_set, cfg, SEED, 0.5, "graded", TF, transfer_from=source,
                               cache_dir=cache_dir)


def test_a_rerun_reads_every_pass_back_and_recomputes_only_what_changed(graded_model, test_set, source, tmp_path,
                                                                        forward_calls, caplog, monkeypatch):
    first = run(graded_model.model, test_set, tmp_path, protocol(), source)
    assert first.cached == [] and sum(forward_calls) > 0
    forward_calls.clear()
    again = run(graded_model.model, test_set, tmp_path, protocol(), source)
    assert sorted(again.cached) == sorted(PASSES) and forward_calls == []  # nothing computed
    assert again.sets == first.sets and again.corrupted == first.corrupted and again.curve == first.curve
    np.testing.assert_array_equal(again.x_adv, first.x_adv)
    # A new Square budget: Square alone runs again.
    changed = run(graded_model.model, test_set, tmp_path,
                  protocol(**{"evaluate.attacks": "[{name: apgd, steps: 3}, {name: square, queries: 20}, "
                                                  "{name: transfer}]"}), source)
    assert sorted(changed.cached) == sorted(p for p in PASSES if p != "square")
    assert changed.sets["apgd"] == first.sets["apgd"]
    # A new epsilon for the mission's FGSM: no gradient at all (its signs are kept), the epsilons seen before read
    # back, forward passes for the new ones only.
    def no_gradient(*args, **kwargs):
        raise AssertionError("an input gradient was computed for an epsilon edit")

    monkeypatch.setattr(Attacker, "signs", no_gradient)
    forward_calls.clear()
    edited = run(graded_model.model, test_set, tmp_path, protocol(**{"evaluate.attack.epsilon": "4"}), source)
    assert "attack" not in edited.cached and {"signs", "curve", "diagnostic"} <= set(edited.cached)
    assert edited.cached.count("curve") == 1  # 2/255 read back; 8/255 had been the mission's epsilon, not the curve's
    assert sum(forward_calls) == len(test_set[1]) + 16  # the attacked set at 4/255, the curve at 8/255 (16 images)
    assert [c["balanced_accuracy"] for c in edited.curve] == [c["balanced_accuracy"] for c in first.curve]
    monkeypatch.undo()
    # A damaged entry (a half-written file from elsewhere, a full disk) is recomputed, never trusted.
    (entry,) = tmp_path.glob("*/transfer-*.npz")
    entry.write_bytes(b"half a file")
    repaired = run(graded_model.model, test_set, tmp_path, protocol(), source)
    assert "transfer" not in repaired.cached and "unreadable" in caplog.text
    assert repaired.sets["transfer"] == first.sets["transfer"]
    # Another transfer source: the transfer pass runs again.
    other = to_uint8(np.clip(source / 255.0 + 0.02, 0, 1))
    assert "transfer" not in run(graded_model.model, test_set, tmp_path, protocol(), other).cached


def test_the_attacks_that_stop_at_the_threshold_run_again_under_another(graded_model, test_set, source, tmp_path):
    """PGD and APGD let an image go once fooled at the model's threshold, Square's loss is the margin there: the same
    weights judged at another threshold (a re-registered model, `threshold.fixed`) must not read their passes."""
    run(graded_model.model, test_set, tmp_path, protocol(), source)
    again = evaluation.run_protocol(graded_model.model, *test_set, protocol(), SEED, 0.7, "graded", TF,
                                transfer_from=source, cache_dir=tmp_path)
    assert sorted(again.cached) == sorted(p for p in PASSES if p not in ("diagnostic", "apgd", "square"))
    fresh = evaluation.run_protocol(graded_model.model, *test_set, protocol(), SEED, 0.7, "graded", TF,
                                transfer_from=source)
    assert again.sets == fresh.sets


def test_the_key_changes_with_the_weights_the_images_the_seed_and_the_engine(graded_model, test_set):
    model, (x, y) = graded_model.model, test_set
    key = cache.model_key(model, x, y, SEED, TF, 64)
    assert cache.model_key(model, x, y, SEED, TF, 64) == key
    assert cache.model_key(model, np.clip(x.astype(int) + 1, 0, 255).astype(np.uint8), y, SEED, TF, 64) != key
    assert cache.model_key(model, x, 1 - y, SEED, TF, 64) != key
    assert cache.model_key(model, x, y, SEED + 1, TF, 64) != key
    assert cache.model_key(model, x, y, SEED, config.Inference(engine="openvino"), 64) != key
    weight = model.trainable_weights[-1]  # the same model, one weight changed (a fine-tuned copy: same layers, names)
    saved = weight.numpy()
    try:
        weight.assign(saved + 0.5)
        assert cache.model_key(model, x, y, SEED, TF, 64) != key
    finally:
        weight.assign(saved)


def test_only_the_newest_models_entries_are_kept(tmp_path):
    for i in range(cache.KEEP + 2):
        cache.PassCache(tmp_path, f"model{i}")("clean", {}, lambda: {"p": np.zeros(2)})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == cache.KEEP and "model0" not in kept and f"model{cache.KEEP + 1}" in kept


def test_square_queries_the_inference_engine_and_it_answers_as_tensorflow(graded_model, test_set):
    # Square's queries are forward passes, so they run where every other forward pass runs (OpenVINO on a CPU);
    # the logits it reads must be TensorFlow's, or its accept/reject steps would follow another model.
    from pipeline.judge.attacks import logit_forward

    x = test_set[0].astype(np.float32) / 255.0
    ov = evaluation.square_forward(graded_model.model, config.Inference(engine="openvino"))
    tf_logits = logit_forward(graded_model.model)(x)
    assert np.abs(ov(x) - tf_logits).max() < 1e-3 * max(1.0, np.abs(tf_logits).max())
    assert ov(x[:3]).shape == (3,)


def test_a_relative_cache_is_the_workspaces_in_a_queued_experiments_copy(tmp_path, monkeypatch):
    from pipeline.io import shared_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert shared_cache(".cache/evaluate") == tmp_path / ".cache/evaluate"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "workspace"))  # what DVC sets in a queued or --temp copy
    assert shared_cache(".cache/evaluate") == tmp_path / "workspace" / ".cache/evaluate"
    assert shared_cache(tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_each_pass_says_the_precision_it_ran_in_and_a_rerun_reads_that_back(graded_model, test_set, source,
                                                                             tmp_path, monkeypatch):
    from tests.model.test_inference import _with_bf16

    checked = config.Inference(engine="openvino", precision="checked", check_images=8)
    _with_bf16(monkeypatch, graded_model.model, 0.0)  # a "bf16" that keeps every label: the check takes it

    def run_checked():
        return evaluation.run_protocol(graded_model.model, *test_set, protocol(), SEED, 0.5, "graded", checked,
                                   transfer_from=source, cache_dir=tmp_path)

    first = run_checked()
    labelled = {"clean", "attack", "diagnostic", "apgd", "square", "transfer", "corruption jpeg75", "curve 2",
                "curve 4"}
    assert set(first.precisions) == labelled
    assert set(first.precisions.values()) == {"bf16: labels agree with f32 on 100.00% of 8 images"}
    again = run_checked()
    assert len(again.cached) == len(PASSES) and again.precisions == first.precisions
    # Under another threshold the check could decide otherwise: its passes are kept apart (a float32 run's are not).
    key = [graded_model.model, *test_set, SEED]
    assert cache.model_key(*key, checked, 64, 0.5) != cache.model_key(*key, checked, 64, 0.6)
    assert cache.model_key(*key, TF, 64, 0.5) == cache.model_key(*key, TF, 64, 0.6)
