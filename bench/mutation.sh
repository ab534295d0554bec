#!/usr/bin/env bash
# Mutation testing of the code that decides something (bench/README.md, "Mutation testing"): mutmut 3 mutates the
# functions named below, one module at a time, each against the fast unit tests that pyproject.toml's [tool.mutmut]
# lists, then bench/mutation_table.py prints mutants, killed, survived, equivalent and time per module.
# Slow (minutes on 2 cores) and not part of CI. Usage: bench/mutation.sh [module ...]   (default: all of them)
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A SCOPE=(
  [metrics]="pipeline.judge.metrics.*"
  [corruptions]="pipeline.judge.corruptions.*"
  [registry]="pipeline.judge.registry.x_should_promote__* pipeline.judge.registry.xǁStandingǁtags__*"
  [predicting]="pipeline.use.predicting.x_labels__* pipeline.model.serving.x_resolve_threshold__*"
  [training]="pipeline.fit.training.x_choose_threshold__*"
  [attacks]="pipeline.judge.attacks.x__project__* pipeline.judge.attacks.x_to_uint8__* pipeline.judge.attacks.x_apgd_checkpoints__* pipeline.judge.attacks.x_square_p__*"
  [tuning]="pipeline.fit.tuning.x_best__* pipeline.fit.tuning.xǁObjectiveǁ_scores__*"
)
ORDER=(metrics corruptions registry predicting training attacks tuning)
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${ORDER[@]}")

out=bench/out/mutation
mkdir -p "$out"
rm -rf mutants  # mutmut keeps results in mutants/ and would skip mutants it has tried before
: > "$out/times.tsv"
for m in "${modules[@]}"; do
  [ -n "${SCOPE[$m]:-}" ] || { echo "unknown module: $m (one of ${ORDER[*]})" >&2; exit 2; }
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # the patterns are globs for mutmut, not for the shell
  set -f; mutmut run --max-children "${MUTATION_JOBS:-2}" ${SCOPE[$m]} > "$out/$m.log" 2>&1 || true; set +f
  printf '%s\t%s\t%s\n' "$m" "$(echo "$(date +%s.%N) - $start" | bc)" "${SCOPE[$m]}" >> "$out/times.tsv"
done
mutmut results --all true > "$out/results.txt" 2>/dev/null
python bench/mutation_table.py "$out/results.txt" "$out/times.tsv" bench/mutation-equivalent.txt
