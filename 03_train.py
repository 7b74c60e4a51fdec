"""Step 3: train a GPT on the token shards; checkpoints and metrics go to runs/<name>/.

    python 03_train.py                                       # tiny preset on data/stdlib
    python 03_train.py --data data/tatar_cv/bpe8192 --preset medium --max-steps 5000
    python 03_train.py --name my-run --resume                # continue after a stop or a crash
    torchrun --nproc_per_node 8 03_train.py --preset gpt2 --total-batch-tokens 524288
"""

from collections.abc import Set
from typing import Any

import typer

from minigpt.cli import cli_command, script_app
from minigpt.config import ModelConfig, TrainConfig
from minigpt.train import summary_table, train
from minigpt.utils import console


@cli_command(TrainConfig, overrides=ModelConfig, skip=("vocab_size",))
def main(cfg: TrainConfig, model_overrides: dict[str, Any], given: Set[str]) -> None:
    """Train (or --resume) a GPT with AMP, gradient accumulation, evaluation in bits per byte and checkpoints."""
    summary = train(cfg, model_overrides, given)
    if summary.get("main", True):
        console.print(summary_table(summary))
        console.print(f"next: python quick_test.py --run {summary['run']}   or   minigpt generate --run {summary['run']} --prompt '...'")
    if summary["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    script_app(main)()
