"""What every stage script shares: ``--params``/``-S`` parsing, seeding, and one clear line on failure."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import random
import sys
from collections.abc import Callable

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger("cifake")


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(config.DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one params value for this run, e.g. -S train.epochs=3 (repeatable)",
    )
    return parser


def check_threshold(value: float | None) -> float | None:
    """A ``--threshold`` override, checked before any work (P(FAKE) at or above it is Fake): None or in (0, 1)."""
    if value is not None and not 0.0 < value < 1.0:
        raise config.ConfigError(f"--threshold must lie in (0, 1) (got {value})")
    return value


def load_params(args: argparse.Namespace) -> config.Params:
    return config.load(args.params, args.overrides)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if it is imported) TensorFlow/Keras."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    import numpy as np

    np.random.seed(seed)
    if "keras" in sys.modules or "tensorflow" in sys.modules:
        import keras

        keras.utils.set_random_seed(seed)


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a :class:`PipelineError` prints ``error: …`` and exits 1 (2 for bad params). A native
    crash (TensorFlow, OpenVINO, Pillow) prints every thread's Python stack to stderr, the stage's log, and so do the
    Python processes the stage starts (decode workers, Spark's), through the environment they inherit."""
    faulthandler.enable()
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: outputs were written atomically; nothing half-written was left", file=sys.stderr)
        sys.exit(130)
