"""pipeline.model.inference: OpenVINO gives TensorFlow's answers (labels and probabilities, features to float32 noise),
whatever the batch split; the engine is chosen and keyed as documented; a process that used it exits cleanly."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from pipeline.fit import features
from pipeline.model import derived, inference
from pipeline.model.inference import batched, forward_fn
from pipeline.model.network import feature_extractor

REPO = Path(__file__).resolve().parents[2]
OPENVINO = config.Inference(engine="openvino", precision="f32")
TENSORFLOW = config.Inference(engine="tensorflow")


def test_openvino_gives_tensorflows_probabilities_and_labels(tiny_model) -> None:
    x = tiny_model.x
    p_tf = batched(forward_fn(tiny_model.model), x, 32)[:, 0]
    p_ov = inference.probabilities(tiny_model.model, x, OPENVINO, batch_size=32)
    assert p_ov.shape == p_tf.shape and p_ov.dtype == np.float32
    np.testing.assert_allclose(p_ov, p_tf, atol=1e-5)
    for threshold in (0.5, float(np.median(p_tf))):
        assert np.array_equal(p_ov >= threshold, p_tf >= threshold)


def test_openvino_features_match_tensorflows_to_float32_noise(tiny_model) -> None:
    fe = feature_extractor(tiny_model.model)
    f_tf = batched(forward_fn(fe), tiny_model.x, 64)
    f_ov = inference.runner(fe, OPENVINO)(tiny_model.x, 64)
    assert f_ov.shape == (len(tiny_model.x), 2048)
    assert np.abs(f_ov - f_tf).max() <= 1e-5 * np.abs(f_tf).max()


@pytest.mark.parametrize("batch_size", [1, 7, 50, 128, 500])
def test_any_batch_split_gives_the_same_answers_in_order(tiny_model, batch_size) -> None:
    x = tiny_model.x[:100]
    whole = inference.probabilities(tiny_model.model, x, OPENVINO, batch_size=100)
    np.testing.assert_allclose(inference.probabilities(tiny_model.model, x, OPENVINO, batch_size=batch_size),
                               whole, atol=1e-6)


def test_openvino_is_deterministic_and_takes_floats_in_unit_range(tiny_model) -> None:
    x = tiny_model.x[:64]
    first = inference.probabilities(tiny_model.model, x, OPENVINO, batch_size=16)
    assert np.array_equal(first, inference.probabilities(tiny_model.model, x, OPENVINO, batch_size=16))
    as_floats = x.astype(np.float32) / 255.0
    np.testing.assert_allclose(inference.probabilities(tiny_model.model, as_floats, OPENVINO), first, atol=1e-6)


def test_empty_input_gives_empty_output(tiny_model) -> None:
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    for engine in (OPENVINO, TENSORFLOW):
        assert inference.runner(tiny_model.model, engine)(empty, 32).shape == (0, 1)


def test_bf16_stays_close_to_float32(graded_model) -> None:
    if inference.precision(config.Inference(engine="openvino", precision="auto")) != "bf16":
        pytest.skip("this CPU has no native bfloat16 (OpenVINO's own pick here is f32, and its bf16 setting would "
                    "compute in f32): no bf16 arithmetic to check on this machine")
    # The graded model's P(FAKE) spreads over (0, 1), so rounding in bf16 shows, and could move labels.
    bf16 = config.Inference(engine="openvino", precision="bf16")
    p_f32 = inference.probabilities(graded_model.model, graded_model.x, OPENVINO)
    p_bf16 = inference.probabilities(graded_model.model, graded_model.x, bf16)
    assert not np.array_equal(p_bf16, p_f32)  # bf16 really ran
    assert np.abs(p_bf16 - p_f32).max() < 0.05
    assert ((p_bf16 >= 0.5) == (p_f32 >= 0.5)).mean() >= 0.97


def test_auto_precision_is_what_openvino_picks_on_this_cpu_and_keys_what_it_computes() -> None:
    import openvino as ov

    auto = config.Inference(engine="openvino", precision="auto")
    chosen = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    assert inference.precision(auto) == chosen in ("f32", "bf16", "f16")
    assert inference.describe(auto) == f"openvino-{chosen}"  # the feature cache and the logs name the real one
    assert inference.precision(OPENVINO) == "f32"


def test_runner_is_built_once_per_model_and_engine(tiny_model) -> None:
    a = inference.runner(tiny_model.model, OPENVINO)
    assert inference.runner(tiny_model.model, OPENVINO) is a
    assert isinstance(inference.runner(tiny_model.model, TENSORFLOW), inference.TensorFlowRunner)
    assert isinstance(a, inference.OpenVinoRunner)


def test_auto_is_openvino_without_a_gpu_and_engines_key_the_feature_cache(tmp_path) -> None:
    import tensorflow as tf

    auto = config.Inference()
    expected = "tensorflow" if tf.config.list_physical_devices("GPU") else "openvino"
    assert inference.resolve(auto) == expected
    assert inference.describe(OPENVINO) == "openvino-f32" and inference.describe(TENSORFLOW) == "tensorflow"
    x_file = tmp_path / "x.npy"
    np.save(x_file, np.zeros((2, 32, 32, 3), np.uint8))
    cfg = config.load(REPO / "params.yaml").model
    keys = {features.cache_key(x_file, cfg, 0, e) for e in
            (OPENVINO, TENSORFLOW, config.Inference(engine="openvino", precision="bf16"))}
    assert len(keys) == 3  # features from another engine are never taken for these
    # nor from another batch size (features move with it, and DVC reruns tune and train on model.batch_size)
    assert features.cache_key(x_file, cfg.model_copy(update={"batch_size": 128}), 0, OPENVINO) not in keys


def test_a_process_that_ran_openvino_exits_cleanly(small_model_file) -> None:
    # OpenVINO's stream threads used to deadlock or abort the process at exit beside TensorFlow's, when a Python
    # callback was still referenced: this runs the way the stages do, several times (on the small model: the
    # threads are OpenVINO's whatever it runs, and loading and converting a ResNet50 three times cost ~40 s).
    script = textwrap.dedent(f"""
        import numpy as np
        from pipeline import config
        from pipeline.model import inference, store
        m = store.load({str(small_model_file)!r})
        p = inference.probabilities(m, np.zeros((300, 32, 32, 3), np.uint8), config.Inference(engine="openvino"))
        print("ok", p.shape)
    """)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
        assert proc.returncode == 0 and "ok (300,)" in proc.stdout, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr


CHECKED = config.Inference(engine="openvino", precision="checked", check_images=64, agreement=0.999)


class _Shifted(inference.Runner):
    """Stands in for the bf16 runner: float32's answers moved by ``shift``, so labels near the threshold flip."""

    def __init__(self, model, shift: float):
        self.f32, self.shift = inference.runner(model, OPENVINO), shift

    def __call__(self, x, batch_size, progress=None):
        return np.clip(self.f32(x, batch_size) + self.shift, 0.0, 1.0)


def _with_bf16(monkeypatch, model, shift: float) -> None:
    monkeypatch.setattr(inference, "native_bf16", lambda: True)
    inference.runner(model, OPENVINO)  # the model's entry in the table of derived objects exists
    monkeypatch.setitem(derived._BY_MODEL[model], ("runner", "openvino-bf16"), _Shifted(model, shift))


def test_checked_falls_back_to_float32_and_warns_where_bf16_moves_labels(graded_model, monkeypatch, caplog) -> None:
    x, m = graded_model.x, graded_model.model
    p_f32 = inference.probabilities(m, x, OPENVINO)
    threshold = float(np.median(p_f32))
    _with_bf16(monkeypatch, m, threshold - float(np.quantile(p_f32, 0.45)) + 1e-6)  # flips 5 % of the labels
    with caplog.at_level("WARNING", logger="pipeline.model.inference"):
        p, how = inference.checked_probabilities(m, x, CHECKED, threshold, seed=0)
    assert how.startswith("f32: bf16 labels agreed on") and "below 99.90%" in how
    assert np.array_equal(p, p_f32)  # exactly the float32 pass, not a mix
    assert any("runs in f32" in r.getMessage() for r in caplog.records)


def test_checked_takes_bf16_where_its_labels_agree(graded_model, monkeypatch, caplog) -> None:
    x, m = graded_model.x, graded_model.model
    p_f32 = inference.probabilities(m, x, OPENVINO)
    _with_bf16(monkeypatch, m, 1e-7)  # moves scores, keeps every label at this threshold
    threshold = float(np.median(p_f32)) + 1e-3
    with caplog.at_level("WARNING", logger="pipeline.model.inference"):
        p, how = inference.checked_probabilities(m, x, CHECKED, threshold, seed=0)
    assert how == "bf16: labels agree with f32 on 100.00% of 64 images"
    assert not np.array_equal(p, p_f32) and np.array_equal(p >= threshold, p_f32 >= threshold)
    assert not caplog.records


def test_checked_stays_float32_where_the_check_cannot_pay(graded_model, monkeypatch) -> None:
    x, m = graded_model.x, graded_model.model
    p_f32 = inference.probabilities(m, x, OPENVINO)
    monkeypatch.setattr(inference, "native_bf16", lambda: False)
    p, how = inference.checked_probabilities(m, x, CHECKED, 0.5, seed=0)
    assert how == "f32: this CPU has no native bfloat16" and np.array_equal(p, p_f32)
    few = x[:64]
    p_few = inference.probabilities(m, few, OPENVINO)  # not p_f32[:64]: a pass's last bits depend on its batch (Zen 3)
    _with_bf16(monkeypatch, m, 0.05)
    p, how = inference.checked_probabilities(m, few, CHECKED, 0.5, seed=0)
    assert how == "f32: 64 images, no more than the 64 of the check" and np.array_equal(p, p_few)
    tf_checked = CHECKED.model_copy(update={"engine": "tensorflow"})
    assert inference.checked_probabilities(m, few, tf_checked, 0.5, 0)[1] == "f32: the tensorflow engine runs " \
                                                                            "float32 only"


def test_checked_on_this_cpus_own_bf16(graded_model) -> None:
    if not inference.native_bf16():
        pytest.skip("this CPU has no native bfloat16: `checked` runs every pass in f32 here (tested above)")
    x, m = graded_model.x, graded_model.model
    p, how = inference.checked_probabilities(m, x, CHECKED, 0.5, seed=0)
    p_bf16 = inference.probabilities(m, x, config.Inference(engine="openvino", precision="bf16"))
    p_f32 = inference.probabilities(m, x, OPENVINO)
    # Whichever way the check went, the pass is wholly one precision, and the reason says which.
    assert np.array_equal(p, p_bf16 if how.startswith("bf16") else p_f32)
    assert how.startswith(("bf16: labels agree with f32 on", "f32: bf16 labels agreed on"))
