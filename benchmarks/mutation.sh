#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the loss paths: hf_distill/losses.py, hf_distill/vocab_losses.py,
# hf_distill/collator.py, the loss-routing methods of hf_distill/trainer.py (the dense and the fused causal-LM
# path), the task specs' routing methods in hf_distill/tasks.py and the choice of the loss path in
# hf_distill/loss_path.py, against the fast tests that cover them. Not part of the test run: it takes about
# 15 minutes on two cores (MUTATION_JOBS=2; measured 13 minutes at 4c9d08c beside one single-threaded run).
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
# the issue-18 "before" score used "tests/test_losses.py tests/test_trainer.py", whose survivors take a
# minute each). The causal-LM and on-policy files cover the fused path, the chunked loss and the rollouts'
# token mean in compute_loss; test_loss_path.py covers choose_loss_path and choose_teacher_source.
default_tests="tests/test_losses.py tests/test_loss_routes.py tests/test_lm_losses.py tests/test_lm_trainer.py"
default_tests+=" tests/test_gkd_losses.py tests/test_on_policy.py tests/test_loss_path.py"
read -r -a tests <<< "${MUTATION_TESTS:-$default_tests}"
# What is mutated: whole modules, these methods of the trainer, the task specs' routing methods (every spec
# class) and the loss-path choice. mutmut names a method's mutants <module>.xǁ<Class>ǁ<method>__mutmut_<n>
# and a function's <module>.x_<function>__mutmut_<n>.
targets=(
  'hf_distill.losses.*'
  'hf_distill.vocab_losses.*'
  'hf_distill.collator.*'
)
for method in compute_loss compute_teacher_outputs compute_kd_loss compute_dense_loss compute_fused_lm_loss \
  _fused_teacher_inputs compute_hidden_loss compute_attention_loss combine_losses; do
  targets+=("hf_distill.trainer.xǁDistillationTrainerǁ${method}__mutmut_*")
done
for method in logits kd_mask align targets kd_loss position_selector check_labels; do
  targets+=("hf_distill.tasks.xǁ*Specǁ${method}__mutmut_*")
done
targets+=(
  'hf_distill.tasks.x_labels_for_student__mutmut_*'
  'hf_distill.loss_path.x_choose_teacher_source__mutmut_*'
  'hf_distill.loss_path.x_choose_loss_path__mutmut_*'
)

rm -rf "$work"
mkdir -p "$work"
cp -r "$repo/hf_distill" "$repo/tests" "$work/"
mkdir -p "$work/benchmarks"
cp "$repo"/benchmarks/*.py "$work/benchmarks/"  # test_lm_losses.py loads bench_lm_loss.py
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
only_mutate = [
  "hf_distill/losses.py", "hf_distill/vocab_losses.py", "hf_distill/collator.py", "hf_distill/trainer.py",
  "hf_distill/tasks.py", "hf_distill/loss_path.py",
]
pytest_add_cli_args_test_selection = [$(IFS=,; echo "${selected[*]}")]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]
use_git_change_detection = false
also_copy = ["benchmarks"]
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
