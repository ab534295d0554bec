"""DVC stage ``fetch``: put the raw CIFAKE tree at ``paths.raw`` from ``data.source`` (sample, local or kaggle).

    python src/fetch.py [--params params.yaml] [-S data.source=local -S data.path=cifake.zip]
"""
from __future__ import annotations

import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli
from pipeline.data import sources

log = cli.log


def main() -> None:
    args = cli.stage_parser(__doc__.splitlines()[0]).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    source = params.data.source
    origin = {"sample": "built-in sample", "local": str(params.data.path), "kaggle": params.data.kaggle_handle}[source]
    log.info("fetch: %s (%s) -> %s", source, origin, params.paths.raw)
    counts = sources.fetch(params, params.paths.raw)
    for folder, n in counts.items():
        log.info("  %-10s %6d files", folder, n)
    log.info("fetch: %d files in %s", sum(counts.values()), params.paths.raw)


if __name__ == "__main__":
    cli.run(main)
