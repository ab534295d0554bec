"""What is built from a Keras model once and reused while the model lives: its compute twin, its compiled forward
pass, its inference runners, its attack gradient, its Grad-CAM passes (tracing and conversion cost more than a
batch). Kept beside the model, keyed weakly by it, never set on it.

An entry goes when its model goes, so a derived object must not hold the model object itself (it would keep its
own key alive): it holds the model's layers and variables, as a functional model built on them or a function
traced through them does (a model that is its own derived object, such as its own compute twin, is kept as a
marker, not as itself). tests/model/test_derived.py checks that each kind lets its model go."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import keras

T = TypeVar("T")
_BY_MODEL: weakref.WeakKeyDictionary[keras.Model, dict[Any, Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # the table, not the builds: two threads may build one entry, the first one stays
_ITSELF = object()


def derived(model: keras.Model, key: Any, build: Callable[[], T]) -> T:
    """``model``'s entry ``key``, built by ``build()`` the first time it is asked for."""
    with _LOCK:
        value = _BY_MODEL.setdefault(model, {}).get(key)
    if value is None:
        built = build()
        with _LOCK:
            value = _BY_MODEL.setdefault(model, {}).setdefault(key, _ITSELF if built is model else built)
    return model if value is _ITSELF else value

