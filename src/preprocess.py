"""DVC stage `preprocess`: raw CIFAKE files -> uint8 arrays in params.paths.processed, plus a report.

    python src/preprocess.py [--params params.yaml] [-S preprocess.max_bad_fraction=0.05]
"""
from __future__ import annotations

import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from pipeline import cli, io
from pipeline.data import preprocess


def main() -> None:
    args = cli.stage_parser(__doc__.splitlines()[0]).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    report = preprocess.preprocess(
        params.paths.raw, params.paths.processed, params.preprocess, params.base.seed, progress=sys.stderr.isatty()
    )
    io.write_json(params.paths.preprocess_report, report)
    for split, per_class in report["counts"].items():
        cli.log.info("%-5s %s", split, "  ".join(f"{cls} {n}" for cls, n in per_class.items()))
    cli.log.info(
        "%d images written to %s; %d bad file(s) skipped (%.3f%%, by kind %s); %d converted, %d resized; report %s",
        report["images"], params.paths.processed, len(report["bad"]), 100 * report["bad_fraction"],
        report["bad_by_kind"] or "none", sum(report["converted"].values()), report["resized"],
        params.paths.preprocess_report,
    )
    leaks = report["near_duplicates"]
    cli.log.info("near-duplicates (similarity >= %s): train in val %d, train in test %d, val in test %d%s",
                 leaks["similarity"], leaks["train_in_val"], leaks["train_in_test"], leaks["val_in_test"],
                 f"; dropped {leaks['dropped']}" if "dropped" in leaks else " (reported, kept)")


if __name__ == "__main__":  # the guard matters: decode workers are spawned and re-import this module
    cli.run(main)
