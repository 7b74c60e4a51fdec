#!/usr/bin/env bash
# The whole job, end to end: prepare data -> train tokenizer + shards.
#   bash run_pipeline.sh                      # the embedded default corpus (Python's standard library)
#   bash run_pipeline.sh --input ../shared/corpora/tatar_cv.txt --name tatar --vocab-size 4096
#   bash run_pipeline.sh --install-only       # only install what is missing (used by the test command)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

INPUT=() NAME="" VOCAB=8192 CHAR="" INSTALL_ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --input) INPUT+=("$2"); shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --vocab-size) VOCAB="$2"; shift 2 ;;
    --char) CHAR="--char"; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Install only what is missing. torch comes first and pinned: that exact version is a quick CPU
# wheel on our machines and a CUDA wheel elsewhere; an existing torch (your CUDA build) is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch 2.13.0 (install your own build first to keep it)"
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import importlib.metadata as m; m.version('minigpt'); import pytest, tokenizers, typer, rich, safetensors" 2>/dev/null; then
  echo "== installing minigpt (editable) with its test tools"
  "$PY" -m pip install -q -e ".[dev]"
fi
[[ -n "$INSTALL_ONLY" ]] && exit 0

NAME=${NAME:-stdlib}
echo "== 1/2 prepare data"
"$PY" 01_prepare_data.py "${INPUT[@]}" --name "$NAME"
echo "== 2/2 tokenizer and token shards"
if [[ -n "$CHAR" ]]; then
  "$PY" 02_train_tokenizer.py --data "data/$NAME" --char
else
  "$PY" 02_train_tokenizer.py --data "data/$NAME" --vocab-size "$VOCAB"
fi
echo "== done: token shards in data/$NAME/"
