"""What is built from a model once (pipeline/model/derived.py) is reused while the model lives, and goes with it."""
import gc
import weakref

import keras
import numpy as np
import pytest
from keras import layers

from pipeline import config
from pipeline.judge.attacks import margin_and_gradient
from pipeline.model import derived, inference, network, twin
from pipeline.use import explain
from tests.conftest import small_model

X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
Y = np.array([0, 1, 0, 1], np.float32)


DERIVED = {
    "compute twin": twin.compute_twin,
    "logits model": twin.logits_model,
    "feature extractor": network.feature_extractor,
    "forward pass": lambda m: inference.forward_fn(m)(inference.to_unit(X)),
    "tensorflow runner": lambda m: inference.probabilities(m, X, config.Inference(engine="tensorflow")),
    "openvino runner": lambda m: inference.probabilities(m, X, config.Inference(engine="openvino")),
    "attack gradient": lambda m: margin_and_gradient(m)(inference.to_unit(X), Y),
    "grad-cam pass": lambda m: explain.gradcam_and_proba(m, X, layer="stage_out"),
}


@pytest.mark.parametrize("kind", DERIVED)
def test_a_derived_object_is_built_once_and_lets_its_model_go(kind: str) -> None:
    model = small_model()
    DERIVED[kind](model)
    kept = dict(derived._BY_MODEL[model])
    assert kept, f"{kind}: nothing kept for the model"
    DERIVED[kind](model)
    assert all(derived._BY_MODEL[model][k] is v for k, v in kept.items()), f"{kind}: built again"
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None, f"{kind}: what was derived keeps its model alive (a leak per model)"


def test_the_twin_of_a_model_it_rewrites_is_another_model_and_of_one_it_cannot_the_model_itself() -> None:
    model = small_model()
    assert twin.compute_twin(model) is not model  # the batch norms folded
    plain = keras.Sequential([keras.Input((32, 32, 3)), layers.Flatten(), layers.Dense(1)])
    assert twin.compute_twin(plain) is plain
    np.testing.assert_allclose(inference.forward_fn(plain)(inference.to_unit(X)), plain(inference.to_unit(X)),
                               rtol=1e-6)
    gone = weakref.ref(plain)
    del plain
    gc.collect()
    assert gone() is None, "a model that is its own twin keeps itself alive"
