"""The served model under load and under hostile requests (#40): ``mlflow models serve`` on loopback, bounded runs.

    python bench/load.py                       # 1, 4, 16 clients x 24 requests each, a 5-minute soak, hostile requests
    python bench/load.py --soak-s 600 --requests 48
    python bench/load.py --model models:/cifake-resnet50@champion   # a version of MLFLOW_TRACKING_URI's store
    python bench/load.py --smoke               # bench.common.tiny_model, 1 and 4 clients x 3 requests, a 5 s soak

Without ``--model`` it serves a ResNet50 (weights none, 32×32: the real model's compute) logged as the pipeline logs a
version, in a scratch MLflow store. The server runs as the README starts it (``--env-manager local``, 127.0.0.1, a
free port) and is stopped at the end; every request loop is bounded in count and in time.

Clients are threads with one ``urllib`` request at a time each. Requests cycle through: one PNG, one JPEG, and a
batch of 64 records (PNG and JPEG, with two broken records: a file that is not an image, and a record whose field is
misnamed): each broken record must come back with its own error, the others with ``error == ""``, one answer per
record. Anything else (another status, a missing or extra row, a good record with an error) counts in ``errors``.

Figures (JSON lines): ``load`` per number of clients (requests/s, images/s, p50/p95/p99 latency of each kind,
errors); ``soak``, 4 clients for ``--soak-s`` seconds with the serving process's RSS sampled every 5 s (first, last,
max, and the slope of a least-squares line through the samples of the second half, MiB/min); ``hostile``: each hostile
request's status and answer, the server's RSS after it, and whether the next normal request was answered.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, slope_mib_per_min, stage_env, tiny_model  # noqa: E402

NAME = "cifake-load"
BATCH = 64


# ------------------------------------------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def rss_mib(self) -> float:
        """Resident size of the process that answers (uvicorn, a child of ``mlflow models serve``), in MiB."""
        import psutil

        root = psutil.Process(self.process.pid)
        tree = [root, *root.children(recursive=True)]
        serving = [p for p in tree if "uvicorn" in " ".join(p.cmdline())] or tree
        return max(p.memory_info().rss for p in serving) / 2**20


@contextlib.contextmanager
def serve(model_uri: str, env: dict, log: Path, start_timeout_s: float = 300) -> Iterator[Server]:
    """``mlflow models serve -m model_uri --env-manager local`` on a free loopback port, up when /ping answers;
    stopped (the whole process group) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as r:
                        if r.status == 200:
                            break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)  # uvicorn is a child of the mlflow CLI: stop both
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=30)


def post(url: str, body: bytes, timeout: float = 120,
         content_type: str = "application/json") -> tuple[int, dict | str, float]:
    """(status, parsed answer or its text, seconds)."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    seconds = time.perf_counter() - t0
    try:
        return status, json.loads(text), seconds
    except ValueError:
        return status, text.decode(errors="replace"), seconds


# ------------------------------------------------------------------------------------------------- the payloads


def _file(image, fmt: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Payload:
    kind: str
    body: bytes
    broken: set[int] = field(default_factory=set)  # which records must come back with an error
    records: int = 1


def payloads(seed: int = 0) -> list[Payload]:
    """A PNG alone, a JPEG alone, and a batch of 64 (PNG and JPEG) with two broken records at fixed places."""
    import numpy as np

    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    batch = [{"image": _file(img, "PNG" if i % 2 else "JPEG")} for i, img in enumerate(imgs)]
    batch[10] = {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n not an image at all").decode()}
    batch[40] = {"image": batch[40]["image"], "picture": "a misnamed field"}  # extra field: ignored, still answered
    batch[41] = {"picture": batch[41]["image"]}  # no image field: its own error
    return [Payload("png", json.dumps({"dataframe_records": [{"image": _file(imgs[0], "PNG")}]}).encode()),
            Payload("jpeg", json.dumps({"dataframe_records": [{"image": _file(imgs[1], "JPEG")}]}).encode()),
            Payload("batch64", json.dumps({"dataframe_records": batch}).encode(), {10, 41}, BATCH)]


def check(payload: Payload, status: int, answer) -> str | None:
    """Why an answer is wrong, or None: one row per record, the broken ones with an error, the others without."""
    if status != 200 or not isinstance(answer, dict):
        return f"{payload.kind}: HTTP {status} {str(answer)[:200]}"
    rows = answer.get("predictions", [])
    if len(rows) != payload.records:
        return f"{payload.kind}: {len(rows)} answers to {payload.records} records"
    for i, row in enumerate(rows):
        if bool(row["error"]) != (i in payload.broken) or (row["label"] is None) != (i in payload.broken):
            return f"{payload.kind}: record {i} answered {row}"
    return None


# ------------------------------------------------------------------------------------------------- the load


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, images: int, error: str | None) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            self.images += images
            if error:
                self.errors.append(error)


def percentiles(xs: list[float]) -> dict[str, float]:
    if len(xs) < 2:
        return {"p50_ms": round(1000 * xs[0], 1)} if xs else {}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_ms": round(1000 * q[49], 1), "p95_ms": round(1000 * q[94], 1), "p99_ms": round(1000 * q[98], 1),
            "max_ms": round(1000 * max(xs), 1)}


def drive(url: str, clients: int, requests: int, deadline_s: float, pool: list[Payload],
          on_tick=None) -> tuple[Tally, float]:
    """``clients`` threads, each sending up to ``requests`` requests (cycling through ``pool``, each client from
    another place) and stopping at ``deadline_s`` whatever is left. Returns the tally and the wall seconds."""
    tally, stop_at = Tally(), time.monotonic() + deadline_s

    def client(k: int) -> None:
        for n in range(requests):
            if time.monotonic() > stop_at:
                return
            payload = pool[(k + n) % len(pool)]
            try:
                status, answer, seconds = post(url, payload.body)
            except OSError as err:  # refused, reset, timed out: the server did not answer
                tally.add(payload.kind, deadline_s, 0, f"{payload.kind}: {type(err).__name__}: {err}")
                continue
            error = check(payload, status, answer)
            tally.add(payload.kind, seconds, 0 if error else payload.records - len(payload.broken), error)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1)
        if on_tick:
            on_tick()
    return tally, time.perf_counter() - t0


def load_figures(tally: Tally, seconds: float) -> dict:
    done = sum(len(v) for v in tally.latencies.values())
    return {"requests": done, "seconds": round(seconds, 2), "requests_per_s": round(done / seconds, 2),
            "images_per_s": round(tally.images / seconds, 1), "errors": len(tally.errors),
            "first_errors": tally.errors[:3],
            "latency": {k: percentiles(v) for k, v in sorted(tally.latencies.items())}}


def soak(server: Server, seconds: float, pool: list[Payload], clients: int = 4, every_s: float = 5.0) -> dict:
    """``clients`` clients for ``seconds`` (and at most 100,000 requests each), the server's RSS every ``every_s``."""
    samples: list[tuple[float, float]] = [(0.0, server.rss_mib())]
    t0 = time.monotonic()

    def tick() -> None:
        if time.monotonic() - t0 - samples[-1][0] >= every_s:
            samples.append((time.monotonic() - t0, server.rss_mib()))

    tally, wall = drive(server.url, clients, 100_000, seconds, pool, on_tick=tick)
    samples.append((time.monotonic() - t0, server.rss_mib()))
    half = [s for s in samples if s[0] >= seconds / 2] or samples[-2:]
    slope = slope_mib_per_min(half)
    return {**load_figures(tally, wall), "clients": clients, "rss_first_mib": round(samples[0][1]),
            "rss_last_mib": round(samples[-1][1]), "rss_max_mib": round(max(r for _, r in samples)),
            "rss_slope_second_half_mib_per_min": round(slope, 2), "rss_samples": len(samples),
            "rss_mib": [round(r) for _, r in samples]}


# ------------------------------------------------------------------------------------------------- hostile


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG of a few hundred bytes whose header claims width × height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    rows = zlib.compress(b"\x00" * min(2**20, height * (1 + 3 * width)), 9)  # the start of the promised rows
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def hostile_requests(big_mib: int) -> list[tuple[str, bytes, str]]:
    """(name, body, what the answer must be): ``4xx``, or ``record_error`` (200, one row, with its error), or
    ``answered`` (200, one row, no error)."""
    from PIL import Image

    records = lambda *rs: json.dumps({"dataframe_records": list(rs)}).encode()  # noqa: E731
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    big = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(big, format="PNG")  # max_pixels exactly: 48 MiB of pixels from ~50 KB
    good = json.loads(payloads()[0].body)["dataframe_records"][0]
    return [
        ("body_over_size", records({"image": "A" * (big_mib * 2**20)}), "4xx"),
        ("too_many_records", records(*[good] * 1100), "4xx"),
        ("pixel_bomb_over_max_pixels", records({"image": b64(png_claiming(8192, 8192))}), "record_error"),
        ("pixel_bomb_over_pillow_limit", records({"image": b64(png_claiming(100_000, 100_000))}), "record_error"),
        ("pixel_bomb_at_max_pixels", records({"image": b64(big.getvalue())}), "answered"),
        ("malformed_json", b'{"dataframe_records": [{"image": "abc"', "4xx"),
        ("not_json_at_all", b"\xff\xfe garbage", "4xx"),
        ("wrong_field_name", records({"picture": good["image"]}), "4xx"),
        ("empty_record_list", records(), "4xx"),
        ("pixels_not_hxwx3", records({"pixels": [[1, 2], [3, 4]]}), "4xx"),
    ]


def hostile(server: Server, big_mib: int) -> list[dict]:
    """Each hostile request once, then a normal one: what came back, how long it took, the RSS after."""
    good = payloads()[0]
    out = []
    for name, body, want in hostile_requests(big_mib):
        status, answer, seconds = post(server.url, body)
        rows = answer.get("predictions") if isinstance(answer, dict) else None
        if want == "4xx":
            ok = 400 <= status < 500
        else:
            ok = status == 200 and rows is not None and len(rows) == 1 and bool(rows[0]["error"]) == (
                want == "record_error")
        after = post(server.url, good.body)
        out.append({"request": name, "body_mib": round(len(body) / 2**20, 2), "want": want, "status": status,
                    "ok": ok, "answer": str(answer)[:300], "seconds": round(seconds, 2),
                    "rss_after_mib": round(server.rss_mib()), "still_serving": check(good, after[0], after[1]) is None})
    return out


# ------------------------------------------------------------------------------------------------- main


def register(folder: Path, smoke: bool) -> str:
    """A fresh scratch store in ``folder`` holding the benchmark model as version 1 @champion; its tracking URI."""
    import mlflow

    from pipeline import config
    from pipeline.model import network, serving, store

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mlflow.set_tracking_uri(uri := f"sqlite:///{folder}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", (folder / "artifacts").as_uri()))
    params, keras_file = config.load(ROOT / "params.yaml"), folder / "model.keras"
    cfg = params.model.model_copy(update={"trainable_from": None, "weights": "none", "image_size": 32})
    store.save(tiny_model() if smoke else network.build_model(cfg, 0.0, seed=42), keras_file)
    with mlflow.start_run():
        info = serving.log_version(keras_file, serving.settings(0.5, params.preprocess), "model", NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", info["version"])
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a models:/ URI in MLFLOW_TRACKING_URI's store (default: a scratch ResNet50)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=24, help="requests per client in each load run")
    parser.add_argument("--deadline-s", type=float, default=300, help="each load run stops by then, done or not")
    parser.add_argument("--soak-s", type=float, default=300, help="the long run, 4 clients")
    parser.add_argument("--big-mib", type=int, default=64, help="the oversized body")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 and 4 clients x 3 requests, 5 s soak")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.soak_s, args.big_mib = [1, 4], 3, 5, 20

    env = stage_env()
    if args.model:
        uri, env["MLFLOW_TRACKING_URI"] = args.model, os.environ["MLFLOW_TRACKING_URI"]
    else:
        env["MLFLOW_TRACKING_URI"] = register(SCRATCH / "load-store", args.smoke)
        uri = f"models:/{NAME}@champion"
    pool = payloads()
    t0 = time.perf_counter()
    with serve(uri, env, OUT / "load-server.log") as server:
        started = time.perf_counter() - t0
        rss_start = server.rss_mib()
        # The first request converts the model for the inference engine: timed alone, outside the load figures.
        first = post(server.url, pool[0].body)
        emit("start", start_s=round(started, 1), first_request_s=round(first[2], 2), rss_ready_mib=round(rss_start),
             rss_after_first_mib=round(server.rss_mib()), ok=check(pool[0], first[0], first[1]) is None)
        for clients in args.clients:
            before = loadavg()
            tally, seconds = drive(server.url, clients, args.requests, args.deadline_s, pool)
            emit("load", before, clients=clients, requests_per_client=args.requests, **load_figures(tally, seconds),
                 rss_mib=round(server.rss_mib()))
        before = loadavg()
        emit("soak", before, soak_s=args.soak_s, **soak(server, args.soak_s, pool))
        results = hostile(server, args.big_mib)
        emit("hostile", loadavg(), all_ok=all(r["ok"] and r["still_serving"] for r in results), requests=results,
             rss_end_mib=round(server.rss_mib()))


if __name__ == "__main__":
    main()
