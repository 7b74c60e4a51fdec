"""Step 1: raw text -> clean train/val documents under data/<name>/.

    python 01_prepare_data.py                          # the standard library's sources (default)
    python 01_prepare_data.py books/ --glob '*.txt'    # a folder of books
    python 01_prepare_data.py tat_news_2017_10K.tar.gz # a Leipzig corpus archive
    python 01_prepare_data.py dump.jsonl.gz https://example.org/corpus.txt.gz
"""

from minigpt.cli import cli_command, script_app
from minigpt.config import PrepareConfig, as_dict
from minigpt.corpus import prepare, stats_table
from minigpt.utils import console


@cli_command(PrepareConfig)
def main(cfg: PrepareConfig) -> None:
    """Clean raw text (files, folders, JSONL, Leipzig archives, URLs or 'stdlib') into train/val documents."""
    console.print(f"[bold]prepare[/] {as_dict(cfg)['PrepareConfig']}")
    out, summary = prepare(cfg)
    console.print(stats_table(summary))
    if summary["malformed_lines"]:
        console.print(f"[yellow]skipped {summary['malformed_lines']} malformed JSONL line(s) (not JSON, or no 'text' "
                      f"string), first at {', '.join(summary['malformed_examples'][:3])}; stats.json lists the first 20[/]")
    console.print(f"wrote {out}/ (train, val, stats.json); next: python 02_train_tokenizer.py --data {out}")


if __name__ == "__main__":
    script_app(main)()
