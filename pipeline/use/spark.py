"""Scoring images on Spark with a logged model: Spark's ``binaryFile`` source reads the files, the registered pyfunc
(:mod:`pipeline.model.serving`) scores them through ``mlflow.pyfunc.spark_udf`` on every executor, and the answers come
back as ``Image Name, Predicted Label, p_fake, error`` sorted by name, as ``src/predict.py`` names and orders them.

What is read: a folder (recursively), a glob, a local ``.zip`` (its image entries, refused whole if any entry could
escape, extracted to a temporary folder), or any URI Spark reads (``hdfs://``, ``s3a://``). Every file with an image
suffix is scored, hidden ones too (Spark would skip names starting with ``_`` or ``.``; predict does not). A file
that cannot be decoded gets the pyfunc's reason in ``error``. For local inputs the driver lists the files as predict
does, so the files Spark's reader drops by itself (empty or unreadable ones) get a row with their reason as well.

The model loads once per Python worker, not once per batch: ``spark.python.worker.reuse`` keeps each worker alive
across tasks, and on a cluster ``spark_udf`` keeps the loaded model in a per-process cache (``SparkModelCache``).
In local mode ``spark_udf`` loads the model once per task instead, so the files are packed into one task per core.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import filetree, images
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_dir, atomic_path
from pipeline.use import predicting

NAME, LABEL = predicting.COLUMNS
COLUMNS = (NAME, LABEL, "p_fake", "error")
IMAGE_PATTERN = "(?i)(" + "|".join(re.escape(s) for s in sorted(images.IMAGE_SUFFIXES)) + ")$"
JAVA_HINT = ("Spark needs Java 17 or newer: install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) "
             "or point JAVA_HOME at one")
BATCH_ROWS = 1024  # images per call of the model: bounds a worker's memory whatever the files' size (with the bytes)


def check_java() -> str:
    """The ``java`` Spark will start (JAVA_HOME's, else the PATH's) if it is Java 17 or newer; else one clear error."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise ConfigError(f"no Java found. {JAVA_HINT}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"{java} -version failed ({err}). {JAVA_HINT}") from None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(found[1]) if found else 0
    if major == 1 and found and found[2]:  # "1.8.0_392" is Java 8
        major = int(found[2])
    if major < 17:
        raise ConfigError(f"{java} is Java {major or '(unknown)'}. {JAVA_HINT}")
    return java


def session(master: str, app: str = "cifake-score"):
    """A SparkSession on ``master`` (``local[N]`` or a cluster URL), set up for scoring."""
    check_java()
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("pyspark is not installed: pip install -r requirements.txt") from None
    if is_local(master):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this interpreter, not PATH's python3
    spark = (SparkSession.builder.master(master).appName(app)
             # one Python worker per core, alive across tasks: imports and the loaded model are paid once per worker
             .config("spark.python.worker.reuse", "true")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH_ROWS))
             .config("spark.sql.execution.arrow.maxBytesPerBatch", str(256 * 2**20))
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    return spark


def is_local(master: str) -> bool:
    return master.startswith("local")


def _has_scheme(path: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None and not path.startswith("file://")


@dataclass
class Source:
    """What Spark reads, and how its paths become Image Names."""
    paths: list[str]  # folders, files or URIs handed to Spark's reader
    base: str  # a read path minus this prefix is the Image Name (as Spark writes paths: file:/abs/… for a local one)
    listed: list[str] | None = None  # the image names the driver listed (local inputs): to report what Spark drops
    folder: Path | None = None  # local: where the names live, to tell an empty file from an unreadable one
    damaged: dict[str, str] = field(default_factory=dict)  # zip entries that could not be read: name -> reason


def _local_names(root: Path) -> list[str]:
    with filetree.Tree(root) as tree:
        return [n for n in tree.names() if images.is_image_name(n)]


@contextlib.contextmanager
def source(where: str, unzip_to: str | Path | None = None) -> Iterator[Source]:
    """The input as Spark reads it: a local folder, glob or .zip (listed here as predict lists it), or a URI."""
    if _has_scheme(where):  # hdfs://, s3a://…: Spark lists it; names are relative to the path's folder part
        yield Source([where], where.rstrip("/") + "/" if not glob.has_magic(where) else _glob_base(where))
        return
    local = where.removeprefix("file://")
    if glob.has_magic(local):
        base = _glob_base(local).rstrip("/") or ("/" if local.startswith("/") else ".")
        matches = sorted(glob.glob(local))
        listed = []
        for match in matches:
            rel = os.path.relpath(match, base).replace(os.sep, "/")
            listed += ([f"{rel}/{n}" for n in _local_names(Path(match))] if os.path.isdir(match)
                       else [rel] if images.is_image_name(match) else [])
        if not listed:
            raise DataError(f"--input {where}: no images match (looked for "
                            f"{', '.join(sorted(images.IMAGE_SUFFIXES))})")
        yield Source([os.path.abspath(m) for m in matches], _file_uri(base), listed, Path(base))
        return
    listing = predicting.list_images(Path(local))  # a folder or a zip; raises "no images" as predict does
    if not filetree.is_zip(local):
        folder = os.path.abspath(local)
        yield Source([folder], _file_uri(folder), listing.members, Path(folder))
        return
    parent = Path(unzip_to) if unzip_to else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    extracted = Path(tempfile.mkdtemp(prefix="cifake-unzip-", dir=parent)).absolute()
    damaged: dict[str, str] = {}
    try:
        with filetree.Tree(local) as tree:  # Tree refuses an archive with any unsafe entry before anything is read
            for name in listing.members:
                try:
                    payload = tree.read(name)
                except filetree.Unreadable as err:  # a damaged entry: its row says so, the others are scored
                    damaged[name] = f"unreadable: {err.why}"
                    continue
                target = extracted / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(payload)
        yield Source([str(extracted)], _file_uri(extracted), listing.members, extracted, damaged)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)


def _file_uri(folder: str | Path) -> str:
    """A local folder as the prefix of the paths Spark reads below it: ``file:/abs/folder/``."""
    return "file:" + os.path.abspath(folder).rstrip("/") + "/"


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard, with a trailing slash."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return "/".join(parts[:i]) + "/"
    return pattern.rsplit("/", 1)[0] + "/"


def score(spark, src: Source, model_uri: str, threshold: float | None = None, one_task_per_core: bool = True):
    """A DataFrame of ``Image Name, Predicted Label, p_fake, error`` (unsorted): every image Spark reads, scored by
    ``model_uri``'s pyfunc. ``threshold``: the request's, passed to the model as its ``threshold`` param (None: the
    version's own). ``one_task_per_core``: pack the files into one task per core (local mode: the model loads once
    per task there)."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    files = (spark.read.format("binaryFile")
             .option("recursiveFileLookup", "true")
             .option("ignoredPathSegmentRegex", "")  # read hidden names too, as predict does
             # a file that vanishes or cannot be opened is skipped, not fatal: the driver's listing reports it
             .option("ignoreMissingFiles", "true").option("ignoreCorruptFiles", "true")
             .load(src.paths)
             .where(F.col("path").rlike(IMAGE_PATTERN)))
    if one_task_per_core:
        files = files.coalesce(spark.sparkContext.defaultParallelism)
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local",
                                      params=None if threshold is None else {"threshold": float(threshold)})
    # the pyfunc's request column: the file as base64 (unchunked: Spark may break it into 76-character lines)
    answer = predict(F.struct(F.regexp_replace(F.base64("content"), "[\\r\\n]", "").alias("image")))
    base = src.base if src.base.startswith("file:") else _qualified(spark, src.base)
    # the name: the path below the input's folder (a path elsewhere, which a link could give, stays whole)
    name = F.when(F.startswith("path", F.lit(base)), F.substring("path", len(base) + 1, 2**31 - 1)).otherwise(
        F.col("path"))
    return (files.select(name.alias(NAME), answer.alias("a"))
            # spark_udf turns a failed row's null label into the string "None": a row with an error has no label
            .select(NAME, F.when(F.col("a.error") == "", F.col("a.label")).alias(LABEL),
                    F.col("a.p_fake").alias("p_fake"), F.col("a.error").alias("error")))


def _qualified(spark, uri: str) -> str:
    """``uri`` as Spark writes the paths it reads (``hdfs://nn/x`` → ``hdfs://nn:8020/x/``)."""
    path = spark._jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark._jsc.hadoopConfiguration()).makeQualified(path).toString().rstrip("/") + "/"


def _count(summary: predicting.Summary, row: tuple) -> None:
    name, label, _, error = row
    if error:
        summary.skipped.append((name, error))  # sorted by name: rows come sorted
    else:
        summary.images += 1
        summary.fake += label == predicting.LABELS[1]


def _dropped(src: Source, name: str) -> tuple:
    """The row of a listed image that Spark's reader never returned: it skips empty files and unreadable ones."""
    if name in src.damaged:
        return (name, None, None, src.damaged[name])
    try:
        empty = (src.folder / name).stat().st_size == 0
    except OSError:
        empty = False
    return (name, None, None, "image: empty file" if empty else
            "unreadable: Spark could not open the file (permissions? removed while the job ran?)")


def _with_dropped(src: Source, rows: Iterator[tuple]) -> Iterator[tuple]:
    """``rows`` sorted by name, with the listed images missing from them merged in (Spark sorts names by their
    UTF-8 bytes, which is Python's code-point order)."""
    listed = sorted(src.listed or [])
    i = 0
    for row in rows:
        while i < len(listed) and listed[i] < row[0]:
            yield _dropped(src, listed[i])
            i += 1
        i += i < len(listed) and listed[i] == row[0]
        yield tuple(row)
    yield from (_dropped(src, name) for name in listed[i:])


def write(spark, src: Source, scored, target: str) -> predicting.Summary:
    """Write ``scored`` sorted by name, with a row for each listed image Spark's reader dropped. ``target`` ending
    in .csv: one CSV file, streamed through the driver, which appears only once complete. Anything else: a Parquet
    folder written by the executors (atomically for a local path)."""
    summary = predicting.Summary()
    if target.lower().endswith(".csv"):
        # One sorted partition streamed to the driver: the model runs once, before the shuffle (a global orderBy
        # would sample its input first, running the model twice).
        rows = scored.repartition(1).sortWithinPartitions(NAME).toLocalIterator()
        with atomic_path(Path(target)) as tmp, open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(COLUMNS)
            for row in _with_dropped(src, rows):
                _count(summary, row)
                name, label, p_fake, error = row
                out.writerow((name, label or "", "" if p_fake is None else repr(p_fake), error or ""))
        return summary
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)  # scored once: orderBy samples its input first
    try:
        if src.listed is not None:
            names = scored.select(NAME).repartition(1).sortWithinPartitions(NAME).toLocalIterator()
            dropped = [row for row in _with_dropped(src, ((n[0], None, None, "") for n in names)) if row[3]]
            if dropped:
                scored = scored.unionByName(spark.createDataFrame(dropped, scored.schema))
        ordered = scored.orderBy(NAME)
        if _has_scheme(target):
            ordered.write.mode("overwrite").parquet(target)
        else:
            with atomic_dir(Path(target)) as tmp:
                ordered.write.mode("overwrite").parquet(str(tmp))
        for row in ordered.where(F.col("error") != "").toLocalIterator():
            _count(summary, tuple(row))
        counts = scored.agg(F.count("p_fake"), F.sum((F.col(LABEL) == predicting.LABELS[1]).cast("long"))).first()
        summary.images, summary.fake = int(counts[0]), int(counts[1] or 0)
        return summary
    finally:
        scored.unpersist()
