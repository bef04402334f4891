#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the loss paths: hf_distill/losses.py, hf_distill/collator.py and the
# loss-routing methods of hf_distill/trainer.py, against the fast tests that cover them. Not part of
# the test run: it takes tens of minutes on one core.
#
#   pip install mutmut
#   benchmarks/mutation.sh              # the tests of the working tree
#   MUTATION_TESTS="tests/test_losses.py tests/test_trainer.py" benchmarks/mutation.sh 83ba4af
#                                       # test files as they were at a commit (the "before" score)
#
# It works in a scratch copy (MUTATION_DIR, default .mutation/, ignored by git), so mutmut's mutants/
# never enter the repository, and prints the score and every surviving mutant at the end
# (`cd .mutation && mutmut show <name>` gives a mutant's diff).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-$repo/.mutation}
ref=${1:-}
# The test files that cover the mutated code and run in seconds (MUTATION_TESTS: others, space-separated;
# the "before" score in the README used "tests/test_losses.py tests/test_trainer.py", whose survivors
# take a minute each).
read -r -a tests <<< "${MUTATION_TESTS:-tests/test_losses.py tests/test_loss_routes.py}"
# What is mutated: whole modules, and only these methods of the trainer.
targets=(
  'hf_distill.losses.*'
  'hf_distill.collator.*'
)
for method in compute_teacher_outputs _kd_mask compute_kd_loss compute_hidden_loss compute_attention_loss \
  combine_losses compute_loss; do
  targets+=("hf_distill.trainer.*ǁ${method}__mutmut_*")
done

rm -rf "$work"
mkdir -p "$work"
cp -r "$repo/hf_distill" "$repo/tests" "$work/"
if [[ -n "$ref" ]]; then  # the tests as they were at $ref; files that did not exist then are left out
  rm -rf "$work/tests"
  mkdir -p "$work/tests"
  git -C "$repo" archive "$ref" tests | tar -x -C "$work"
fi
find "$work" -name __pycache__ -prune -exec rm -rf {} +
selected=()
for t in "${tests[@]}"; do [[ -f "$work/$t" ]] && selected+=("\"$t\""); done
cp "$repo/pyproject.toml" "$work/"
cat >> "$work/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["hf_distill"]
only_mutate = ["hf_distill/losses.py", "hf_distill/trainer.py", "hf_distill/collator.py"]
pytest_add_cli_args_test_selection = [$(IFS=,; echo "${selected[*]}")]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]
use_git_change_detection = false
TOML
cd "$work"
unset PYTHONPATH  # the mutated copy, not the repository's hf_distill
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mutmut run --max-children "${MUTATION_JOBS:-1}" "${targets[@]}" || true
python - "${targets[@]}" <<'PY'
import fnmatch, subprocess, sys
from collections import Counter
out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
rows = [line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line]
rows = [(name, status) for name, status in rows if any(fnmatch.fnmatch(name, t) for t in sys.argv[1:])]
counts = Counter(status for _, status in rows)
killed = counts["killed"] + counts["timeout"]
print(dict(counts))
print(f"killed {killed}/{len(rows)} = {killed / max(len(rows), 1):.1%}")
for name, status in rows:
    if status not in ("killed", "timeout"):
        print(f"  {status}: {name}")
PY
