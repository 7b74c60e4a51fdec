#!/usr/bin/env bash
# The whole job, end to end: prepare data -> tokenizer + shards -> train -> quick test.
#   bash run_pipeline.sh                          # the built-in corpus (Python's standard library)
#   bash run_pipeline.sh --input ../shared/corpora/tatar_cv.txt --name tatar --vocab-size 4096 --preset small
#   bash run_pipeline.sh --max-steps 200 -- --lr 3e-3   # options after -- go to 03_train.py as they are
#   bash run_pipeline.sh --install-only           # only install what is missing (part of the test command)
# Options: --input PATH|URL (repeatable), --name, --preset, --device, --max-steps, --max-minutes,
#          --vocab-size, --char, --data-dir, --runs-dir, --install-only.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

INPUT=() NAME="" PRESET="" DEVICE=auto MAX_STEPS="" MAX_MINUTES="" VOCAB=0 CHAR="" INSTALL_ONLY=""
DATA_DIR=data RUNS_DIR=runs EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --input) INPUT+=("$2"); shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --max-steps) MAX_STEPS="$2"; shift 2 ;;
    --max-minutes) MAX_MINUTES="$2"; shift 2 ;;
    --vocab-size) VOCAB="$2"; shift 2 ;;
    --char) CHAR=1; shift ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --runs-dir) RUNS_DIR="$2"; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Install only what is missing. torch comes first and pinned: that exact version is a quick CPU
# wheel on our machines and a CUDA wheel elsewhere; an existing torch (your CUDA build) is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch 2.13.0 (install your own build first to keep it)"
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import importlib.metadata as m; m.version('minigpt'); import pytest, importlinter, pyarrow, transformers, onnx, onnxscript, onnxruntime, tokenizers, typer, rich, safetensors, fastapi, uvicorn, prometheus_client, openai, httpx, playwright, schemathesis" 2>/dev/null; then
  echo "== installing minigpt (editable) with its test tools, Parquet reading, export and the server"
  "$PY" -m pip install -q -e ".[dev,parquet,export,serve]"
fi
[[ -n "$INSTALL_ONLY" ]] && exit 0

# The training recipe for this machine (minigpt/config.py RECIPES): cpu is sized to finish in about
# 8 minutes on 2 cores, gpu trains a bigger model. Options given here or after -- win over the recipe.
if [[ "$DEVICE" == cuda* ]] || { [[ "$DEVICE" == auto ]] && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; }; then
  RECIPE=gpu
else
  RECIPE=cpu
fi
TRAIN=(--recipe "$RECIPE")
# a preset given here is kept as it is; the recipe's may shrink to fit a small corpus (03_train.py says so)
[[ -n "$PRESET" ]] && TRAIN+=(--preset "$PRESET")
PRESET=${PRESET:-$("$PY" -c "import sys; from minigpt.config import RECIPES; print(RECIPES[sys.argv[1]]['preset'])" "$RECIPE")}
[[ -n "$MAX_STEPS" ]] && TRAIN+=(--max-steps "$MAX_STEPS")
[[ -n "$MAX_MINUTES" ]] && TRAIN+=(--max-minutes "$MAX_MINUTES")

# ${A[@]+"${A[@]}"}: an empty array is fine under set -u, even in macOS's bash 3.2
NAME=${NAME:-$("$PY" -c "import sys; from minigpt.corpus import default_name; print(default_name(sys.argv[1:]))" ${INPUT[@]+"${INPUT[@]}"})}
RUN="$NAME-$PRESET"

echo "== 1/4 prepare data -> $DATA_DIR/$NAME"
"$PY" 01_prepare_data.py ${INPUT[@]+"${INPUT[@]}"} --name "$NAME" --out-dir "$DATA_DIR"
# the token folder: bpe<vocab> (the vocab sized to the corpus unless --vocab-size says) or char
TOKENS=$("$PY" -c "import sys; from minigpt.config import TokenizerConfig as C; from minigpt.tokenizer import resolve_vocab
from minigpt.utils import UserError
try:
    print(resolve_vocab(sys.argv[1], C(data=sys.argv[1], vocab_size=int(sys.argv[2]), char=bool(sys.argv[3])))[1])
except ValueError:
    sys.exit(print('run_pipeline.sh: --vocab-size takes a number', file=sys.stderr) or 2)
except UserError as e:
    sys.exit(print(f'error: {e}', file=sys.stderr) or 2)" "$DATA_DIR/$NAME" "$VOCAB" "$CHAR")
echo "== 2/4 tokenizer and token shards -> $TOKENS"
if [[ -n "$CHAR" ]]; then
  "$PY" 02_train_tokenizer.py --data "$DATA_DIR/$NAME" --char
else
  "$PY" 02_train_tokenizer.py --data "$DATA_DIR/$NAME" --vocab-size "$VOCAB" --out "$TOKENS"
fi
echo "== 3/4 train -> $RUNS_DIR/$RUN"
"$PY" 03_train.py --data "$TOKENS" --name "$RUN" --runs-dir "$RUNS_DIR" --device "$DEVICE" "${TRAIN[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
echo "== 4/4 quick test"
"$PY" quick_test.py --run "$RUNS_DIR/$RUN" --device "$DEVICE"
echo "== done. The run is in $RUNS_DIR/$RUN/ (best/, last/, metrics.jsonl). Try (a prompt from your own text):"
"$PY" -c "import shlex, sys; from minigpt.corpus import sample_prompt; p, tags = sample_prompt(sys.argv[2])
print('   minigpt generate --run', shlex.quote(sys.argv[1]), *(['--prompt', shlex.quote(p)] if p else []),
      *[t for k, v in tags.items() for t in ('--tag', shlex.quote(k + '=' + v))])" \
  "$RUNS_DIR/$RUN" "$DATA_DIR/$NAME"
