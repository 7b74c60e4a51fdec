"""Step 4: is the model any good? Samples (one per tag value too), per-sentence perplexity, val bits per
byte, and a baseline.

    python quick_test.py                      # the most recent run under runs/
    python quick_test.py --run runs/tatar --prompt "Казан шәһәре" --temperature 0.7

Exits with status 1 when the model is no better than a unigram model of the training tokens.
"""

import itertools
import math
from pathlib import Path

import torch
import typer
from rich.markup import escape
from rich.table import Table

from minigpt.checkpoint import load_run
from minigpt.cli import cli_command, script_app
from minigpt.config import QuickTestConfig, Sampling
from minigpt.corpus import iter_documents
from minigpt.data import TokenData, eval_windows, parse_tag, tag_ids_of
from minigpt.evaluate import evaluate, no_better_than_unigram, unigram_baseline
from minigpt.generate import generate_many
from minigpt.utils import UserError, console, resolve_device, rule


@cli_command(QuickTestConfig)
@torch.no_grad()
def main(cfg: QuickTestConfig) -> None:
    """Print samples, per-sentence perplexity and val bits per byte; fail if a unigram model does as well."""
    device = resolve_device(cfg.device)
    run = load_run(cfg.run, cfg.checkpoint, device, cfg.runs_dir)
    model, block = run.model, run.model.cfg.block_size
    folder = cfg.data or run.config["data"].get("folder")
    if not folder:
        raise UserError(f"{run.folder.parent} has no data of its own (an imported model); pass --data with token "
                        "shards encoded with its tokenizer (02_train_tokenizer.py --tokenizer).")
    data = TokenData(folder)
    if data.meta["tokenizer_sha256"] != run.config["data"]["tokenizer_sha256"]:
        raise UserError(f"{data.folder} was encoded with another tokenizer than {run.folder}; pass matching --data.")
    console.print(f"[bold]quick test[/] {run.folder} (step {run.config.get('step')}, {model.num_params():,} parameters, "
                  f"{run.matmul}) on {data.folder}")

    # 1. samples: the given prompts, else the first words of a few val documents
    dataset = Path(data.meta["dataset"])
    val_docs = list(itertools.islice(iter_documents(dataset, "val"), 200)) if dataset.exists() else []
    prompts = cfg.prompt or [" ".join(d.split(" ")[:4])[:40] for d, _ in val_docs[:3]] or [""]
    ids = [[run.bos, *run.encode(prompt)][-(block - 1) :] for prompt in prompts]
    samples = {temp: generate_many(model, ids, cfg.max_new_tokens, Sampling(temp, top_k=100), 1, run.eot, cfg.seed)
               for temp in cfg.temperature}  # all prompts in one batch per temperature
    for i, prompt in enumerate(prompts):
        for temp in cfg.temperature:
            rule(f"prompt {i + 1}, temperature {temp}")
            console.print(prompt + run.decode(samples[temp][i][0]), markup=False, highlight=False)

    # 1b. one sample per value of each tag field (a few values), from a document start with that tag
    by_field: dict[str, list[str]] = {}
    for token in sorted(run.tags):
        field, value = parse_tag(token)
        by_field.setdefault(field, []).append(value)
    tagged = [{field: value} for field, values in by_field.items() for value in values[: cfg.tag_values]]
    if tagged:
        rows = generate_many(model, [run.prompt("", t)[0] for t in tagged], cfg.max_new_tokens,
                             Sampling(0.8, top_k=100), 1, run.eot, cfg.seed)
        for t, row in zip(tagged, rows, strict=True):
            rule(f"tag {', '.join(f'{k}={v}' for k, v in t.items())}, temperature 0.8")
            console.print(run.decode(row[0]), markup=False, highlight=False)

    # 2. perplexity of a few short val sentences (the first line of a document), each from a document start
    table = Table(title="per-sentence perplexity (val)")
    for col in ("sentence", "tokens", "nats/token", "perplexity"):
        table.add_column(col, justify="left" if col == "sentence" else "right")
    lines = [(d.splitlines()[0].strip(), tags) for d, tags in val_docs if d.strip()]
    for sentence, tags in [(s, t) for s, t in lines if 10 <= len(s) <= 300][: cfg.sentences]:
        # from a document start, with the document's tags, as the shards hold it
        ids = [run.bos, *tag_ids_of(tags, run.tags), *run.encode(sentence)][: block + 1]
        x = torch.tensor([ids], device=device)
        loss = float(model(x[:, :-1], x[:, 1:]).loss)
        table.add_row(escape(sentence[:70]), str(x.size(1) - 1), f"{loss:.3f}", f"{math.exp(loss):.1f}")
    console.print(table)

    # 3. val loss and bits per byte, against a unigram model of the training tokens on the same targets
    windows = eval_windows(data.val, block, cfg.eval_tokens)
    score = evaluate(model, data.val.arrays, windows, data.token_bytes, 16, device, torch.float32, unscored=data.bos)
    unigram = unigram_baseline(data, windows)
    t = Table(title=f"val, {score.tokens:,} tokens ({score.bytes:,} bytes of text)")
    for col in ("model", "loss (nats/token)", "bits per byte"):
        t.add_column(col, justify="right")
    t.add_row("this run", f"{score.loss:.4f}", f"{score.bpb:.4f}")
    t.add_row("unigram baseline", f"{unigram.loss:.4f}", f"{unigram.bpb:.4f}")
    console.print(t)
    console.print(f"val_bpb {score.bpb:.4f}")
    if score.loss >= unigram.loss:
        advice = no_better_than_unigram(run.folder.parent, data.train.tokens, score.bpb, unigram.bpb)
        console.print(f"[bold red]{escape(advice)}[/]", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]better than the unigram baseline by {unigram.bpb - score.bpb:.3f} bits per byte[/]")


if __name__ == "__main__":
    script_app(main)()
