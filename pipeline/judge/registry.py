"""The MLflow model registry: each evaluated version's scores as tags, and the one rule that moves ``@champion``.

The champion is chosen by :func:`pipeline.judge.metrics.robust_score`, never by F1 with FAKE positive (which a model
that calls everything FAKE wins). Two scores are compared only when they were measured under the same protocol
(attacks and all their settings, test-set hash, weights, measure, threshold, seed: see
:func:`pipeline.judge.evaluation.protocol`); when the champion's score is from another protocol it is re-scored under
the current one first (white-box against itself). A version never becomes champion at or below the always-FAKE
reference. A registry that cannot be read is an error, never "no champion". Decisions are serialised across
processes and machines by :func:`champion_lock`, so two evaluations finishing at once cannot both move the alias
against the same stale champion.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.errors import TrackingError

log = logging.getLogger(__name__)
CHAMPION = "champion"


@dataclass(frozen=True)
class Standing:
    """A version's scores under one protocol, as stored in its tags."""

    version: str
    robust_score: float
    weighted_f1: float
    protocol: str

    def tags(self) -> dict[str, str]:
        return {"robust_score": f"{self.robust_score:.6f}", "weighted_f1": f"{self.weighted_f1:.6f}",
                "protocol": self.protocol}


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _fail(what: str, err: Exception) -> TrackingError:
    return TrackingError(f"model registry: {what} failed ({getattr(err, 'message', err)}); the champion was not "
                         "changed. Check the tracking store (mlflow.tracking_uri / MLFLOW_TRACKING_URI) and rerun")


def champion(name: str) -> str | None:
    """The version that holds ``@champion``; None when the model is not registered or no version holds it."""
    from mlflow.exceptions import MlflowException

    try:
        version = _client().get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise _fail(f"reading {name}@{CHAMPION}", err) from None
    return None if version is None else str(version)  # MLflow 3.17 gives an int here


def standing(name: str, version: str) -> Standing | None:
    """The scores stored on ``version``, or None when it has none (evaluated before scores were stored)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = _client().get_model_version(name, str(version)).tags
    except MlflowException as err:
        raise _fail(f"reading {name} version {version}", err) from None
    try:
        return Standing(str(version), float(tags["robust_score"]), float(tags["weighted_f1"]), tags["protocol"])
    except (KeyError, ValueError):
        return None


def record(name: str, version: str, tags: dict[str, object]) -> None:
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, str(value))
    except MlflowException as err:
        raise _fail(f"tagging {name} version {version}", err) from None


def should_promote(candidate: Standing, current: Standing | None, reference: dict[str, float]) -> tuple[bool, str]:
    """The champion rule, as a pure function. ``reference``: :func:`pipeline.judge.metrics.reference` on the test
    set."""
    floor_robust, floor_f1 = reference["always_fake_robust_score"], reference["always_fake_weighted_f1"]
    if not (math.isfinite(candidate.robust_score) and candidate.robust_score > floor_robust):
        return False, f"robust_score {candidate.robust_score:.4f} is not above always-FAKE's {floor_robust:.4f}"
    if not candidate.weighted_f1 > floor_f1:
        return False, f"weighted_f1 {candidate.weighted_f1:.4f} is not above always-FAKE's {floor_f1:.4f}"
    if current is None:
        return True, "no champion yet"
    if current.protocol != candidate.protocol:
        raise ValueError(f"version {current.version} was scored under protocol {current.protocol}, the candidate under "
                         f"{candidate.protocol}: re-score it first")
    if candidate.robust_score > current.robust_score:
        return True, f"robust_score {candidate.robust_score:.4f} > {current.robust_score:.4f} (v{current.version})"
    return False, f"robust_score {candidate.robust_score:.4f} <= {current.robust_score:.4f} (v{current.version})"


@contextlib.contextmanager
def champion_lock(name: str, run_id: str, stale_after_s: float = 1800.0, poll_s: float = 0.5,
                  timeout_s: float = 3600.0) -> Iterator[None]:
    """Mutual exclusion for the champion decision, through the registry itself (it is the one thing every
    workspace shares): each contender takes a ticket, a version of the model ``<name>.champion-lock`` that the
    registry numbers atomically, and goes once no lower ticket is left (a bakery lock). A thread stamps a live
    contender's ticket every quarter of ``stale_after_s``, however long it waits or holds (a champion's re-score
    is a whole evaluation), so a ticket unstamped for ``stale_after_s`` belongs to a process that died holding it
    and is removed. A tracking server accepts a version only with a source inside a real run, so the ticket
    points into the contender's run ``run_id``."""
    from mlflow.exceptions import MlflowException

    client, lock = _client(), f"{name}.champion-lock"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    try:
        try:
            client.create_registered_model(lock, description=f"Tickets serialising {name}@{CHAMPION} decisions")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        ticket = int(client.create_model_version(lock, source=f"runs:/{run_id}/champion-lock", run_id=run_id,
                                                 tags={"holder": holder}, await_creation_for=0).version)
    except MlflowException as err:
        raise _fail(f"taking a ticket for {name}@{CHAMPION}", err) from None
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(stale_after_s / 4):
            with contextlib.suppress(MlflowException):  # a missed beat costs nothing while the next ones land
                client.set_model_version_tag(lock, str(ticket), ALIVE_TAG, str(int(time.time() * 1000)))

    beating = threading.Thread(target=heartbeat, name="champion-lock-heartbeat", daemon=True)
    beating.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            ahead = [v for v in client.search_model_versions(f"name='{lock}'") if int(v.version) < ticket]
            now_ms = time.time() * 1000
            for stale in [v for v in ahead if now_ms - _last_sign_of_life(v) > stale_after_s * 1000]:
                log.warning("registry: removing stale %s ticket %s of %s", lock, stale.version, stale.tags)
                try:
                    client.delete_model_version(lock, stale.version)
                except MlflowException as err:  # gone already: its holder finished, or another waiter removed it
                    if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                ahead.remove(stale)
            if not ahead:
                break
            if time.monotonic() > deadline:
                raise TrackingError(f"model registry: waited {timeout_s:.0f} s for {name}@{CHAMPION} decisions "
                                    f"ahead of this one ({[v.tags.get('holder') for v in ahead]})")
            time.sleep(poll_s)
        yield
    finally:
        done.set()
        beating.join(timeout=60)
        with contextlib.suppress(MlflowException):
            client.delete_model_version(lock, str(ticket))


ALIVE_TAG = "alive_ms"  # a champion-lock ticket's latest heartbeat, epoch milliseconds


def _last_sign_of_life(ticket) -> float:
    return max(float(ticket.creation_timestamp), float(ticket.tags.get(ALIVE_TAG, 0)))


def update_champion(name: str, candidate: Standing, reference: dict[str, float],
                    rescore: Callable[[str], Standing]) -> tuple[bool, str]:
    """Store ``candidate``'s scores on its version and move ``@champion`` to it if :func:`should_promote` says so,
    holding :func:`champion_lock`. ``rescore(version)`` evaluates the current champion under the candidate's
    protocol when its stored scores are from another one. Returns (whether the candidate holds ``@champion`` now,
    why)."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = _client().get_model_version(name, candidate.version).run_id
    except MlflowException as err:
        raise _fail(f"reading {name} v{candidate.version}", err) from None
    with champion_lock(name, run_id):
        return _update_champion(name, candidate, reference, rescore)


def _update_champion(name: str, candidate: Standing, reference: dict[str, float],
                     rescore: Callable[[str], Standing]) -> tuple[bool, str]:
    record(name, candidate.version, candidate.tags())
    current_version = champion(name)
    if current_version == candidate.version:
        return True, "already champion"
    current = standing(name, current_version) if current_version is not None else None
    if current_version is not None and (current is None or current.protocol != candidate.protocol):
        log.info("registry: re-scoring %s v%s under protocol %s", name, current_version, candidate.protocol)
        current = rescore(current_version)
        record(name, current_version, current.tags())
    promote, why = should_promote(candidate, current, reference)
    if promote:
        from mlflow.exceptions import MlflowException

        try:
            _client().set_registered_model_alias(name, CHAMPION, str(candidate.version))
        except MlflowException as err:
            raise _fail(f"moving {name}@{CHAMPION} to version {candidate.version}", err) from None
    log.info("registry: %s v%s %s @%s: %s", name, candidate.version, "is now" if promote else "is not", CHAMPION, why)
    return promote, why
