"""The table bench/mutation.sh prints: per module, mutants, killed, survived, equivalent and time, from
``mutmut results --all true``, the run's times and bench/mutation-equivalent.txt (survivors shown to be equivalent:
one ``mutant-name  why`` a line). A mutant with no test that reaches it counts as survived, a timeout as killed.
Usage: python bench/mutation_table.py RESULTS TIMES EQUIVALENT"""
from __future__ import annotations

import fnmatch
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check"}


def main(results: str, times: str, equivalent: str) -> int:
    status = {}
    for line in Path(results).read_text().splitlines():
        name, _, state = line.strip().rpartition(": ")
        if name.startswith("pipeline."):
            status[name] = state
    equal = {}
    for line in Path(equivalent).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.strip().partition(" ")
            equal[name] = why.strip()
    print("| module | functions | mutants | killed | survived | equivalent | killed / non-equivalent | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    total, stale, survivors = Counter(), [], []
    for row in Path(times).read_text().splitlines():
        module, seconds, patterns = row.split("\t")
        mine = {n: s for n, s in status.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns.split())}
        c = Counter()
        for name, state in mine.items():
            if state in KILLED:
                c["killed"] += 1
                stale += [name] if name in equal else []
            elif state == "not checked":
                c["not checked"] += 1
            elif name in equal:
                c["equivalent"] += 1
            else:
                c["survived"] += 1
        c["mutants"] = len(mine)
        c["seconds"] = float(seconds)
        total.update(c)
        for name in sorted(n for n, state in mine.items() if state not in KILLED | {"not checked"} and n not in equal):
            survivors.append(f"{name}: {mine[name]}")
        print(_row(module, " ".join(_function(p) for p in patterns.split()), c))
    print(_row("all", "", total))
    if total["not checked"]:
        print(f"\n{total['not checked']} mutants not checked (the run stopped early: see bench/out/mutation/*.log)")
    if survivors:
        print("\nSurvivors not shown equivalent (`mutmut show NAME` prints the change):\n" + "\n".join(survivors))
    for name in stale:
        print(f"\n{name} is listed as equivalent but was killed: remove it from {equivalent}")
    return 0


def _function(pattern: str) -> str:
    name = pattern.split(".")[-1].removesuffix("__*").removesuffix("*")
    return name.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".") or "all"


def _row(module: str, functions: str, c: Counter) -> str:
    judged = c["killed"] + c["survived"]
    share = f"{100 * c['killed'] / judged:.1f} %" if judged else "-"
    return (f"| {module} | {functions} | {c['mutants']} | {c['killed']} | {c['survived']} | {c['equivalent']} | "
            f"{share} | {c['seconds']:.0f} |")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
