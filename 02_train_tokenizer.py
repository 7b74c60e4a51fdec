"""Step 2: train a tokenizer on data/<name>/ and encode it into uint16 token shards.

    python 02_train_tokenizer.py                                  # BPE, 8192 tokens, on data/stdlib
    python 02_train_tokenizer.py --data data/tatar_cv --vocab-size 4096
    python 02_train_tokenizer.py --data data/tinyshakespeare --char
"""

from minigpt.cli import cli_command, script_app
from minigpt.config import TokenizerConfig, as_dict
from minigpt.tokenizer import build, summary_table
from minigpt.utils import console


@cli_command(TokenizerConfig)
def main(cfg: TokenizerConfig) -> None:
    """Train a byte-level BPE (or character) tokenizer, encode train/val into token shards."""
    console.print(f"[bold]tokenizer[/] {as_dict(cfg)['TokenizerConfig']}")
    result = build(cfg)
    console.print(summary_table(result.meta))
    console.print(f"wrote {result.out}/ (tokenizer.json, shards, meta.json); next: python 03_train.py --data {result.out}")


if __name__ == "__main__":
    script_app(main)()
