"""The evaluator: bits per byte from the bytes actually scored, windows spread over the split, shifted
targets, the model's mode left as it was, and the unigram floor on the same targets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_corpus

from minigpt.config import ModelConfig, PrepareConfig, TokenizerConfig
from minigpt.corpus import prepare
from minigpt.data import TokenData, eval_windows, load_tokenizer, sliding_windows
from minigpt.evaluate import evaluate, unigram_baseline, window_targets
from minigpt.model import GPT
from minigpt.tokenizer import build
from minigpt.utils import Dist

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def char_tokens(toy_dataset: Path) -> Path:
    return build(TokenizerConfig(data=str(toy_dataset), char=True)).out


def toy_model(vocab: int, block: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_bytes_add_up_to_the_text_of_each_split(tokens: Path, char_tokens: Path, kind: str) -> None:
    data = TokenData(tokens if kind == "bpe" else char_tokens)
    for split, shards in (("train", data.train), ("val", data.val)):
        counted = sum(int(data.token_bytes[np.asarray(a)].sum()) for a in shards.arrays)
        assert counted == data.meta["splits"][split]["bytes"]


@pytest.mark.parametrize("name", ["tatar_cv.txt", "tinyshakespeare.txt"])
def test_token_bytes_are_exact_on_real_text(tmp_path: Path, name: str) -> None:
    data_dir, _ = prepare(PrepareConfig(inputs=[str(shared_corpus(name))], out_dir=str(tmp_path / "data")))
    for char in (False, True):
        data = TokenData(build(TokenizerConfig(data=str(data_dir), vocab_size=1024, char=char)).out)
        counted = sum(int(data.token_bytes[np.asarray(a)].sum()) for a in data.val.arrays)
        assert counted == data.meta["splits"]["val"]["bytes"]


def test_bits_per_byte_counts_the_bytes_of_the_scored_tokens(char_tokens: Path) -> None:
    """Scoring part of val divides by the bytes behind exactly those targets (here counted one token at a
    time with the tokenizer), not by the split's average bytes per token."""
    data = TokenData(char_tokens)
    tok = load_tokenizer(data.tokenizer_json)
    byte_ids = {i for t, i in tok.get_vocab().items() if t.startswith("<0x")}
    assert not byte_ids & set(np.concatenate(data.val.arrays).tolist())  # every val character is in the vocab
    model = toy_model(data.vocab_size)
    windows = eval_windows(data.val, 32, 320)
    assert 0 < len(windows) * 32 < data.val.tokens  # a part of val, not all of it
    score = evaluate(model, data.val.arrays, windows, data.token_bytes, 4, CPU, torch.float32)
    targets = window_targets(data.val.arrays, windows).tolist()
    text_bytes = sum(len(tok.decode([t], skip_special_tokens=True).encode("utf-8")) for t in targets)
    assert score.tokens == len(targets) and score.bytes == text_bytes
    assert score.bpb == pytest.approx(score.loss * score.tokens / math.log(2) / text_bytes, rel=1e-9)
    split_average = data.meta["splits"]["val"]["bytes"] / data.meta["splits"]["val"]["tokens"]
    assert abs(text_bytes / len(targets) - split_average) > 1e-3  # the old formula would be off here


def test_eval_windows_cover_the_split_or_spread_over_it(tokens: Path) -> None:
    data = TokenData(tokens)
    T = 16
    every = eval_windows(data.val, T, 10**9)
    covered = {(w.source, p) for w in every for p in range(w.offset + 1 + w.skip, w.offset + w.length)}
    assert covered == {(s, p) for s, n in enumerate(data.val.lengths) for p in range(1, int(n))}  # all, once
    assert sum(w.length - 1 - w.skip for w in every) == len(covered)
    some = eval_windows(data.val, T, 5 * T)
    assert len(some) == 5 and len(set(some)) == 5 and all(w.skip == 0 and w.length == T + 1 for w in some)
    starts = np.cumsum([0, *data.val.lengths[:-1]])
    place = [starts[w.source] + w.offset for w in some]
    assert place == sorted(place)
    assert place[0] < data.val.tokens / 5 and place[-1] > data.val.tokens * 3 / 5  # not just the start
    for w in every + some:
        assert w.offset + w.length <= data.val.lengths[w.source]  # inside its shard


@pytest.mark.parametrize(("n", "stride"), [(1, 4), (3, 4), (5, 4), (6, 4), (13, 4), (13, 2), (10, 1), (200, 3)])
def test_sliding_windows_score_every_token_once_with_enough_context(n: int, stride: int) -> None:
    windows = sliding_windows(n, 4, stride)
    positions = [p for w in windows for p in range(w.offset + 1 + w.skip, w.offset + w.length)]
    assert positions == list(range(1, n))  # every token but the first, once, in order
    assert all(w.length == min(n, 5) and w.offset + w.length <= n for w in windows)
    for w in windows[1:-1]:
        assert w.skip >= 4 - stride  # each scored target sees at least block - stride tokens before it


def test_loss_is_against_the_next_token_and_the_mode_is_restored(tokens: Path) -> None:
    data = TokenData(tokens)
    model = toy_model(data.vocab_size)
    windows = eval_windows(data.val, 32, 32 * 6)
    x = torch.from_numpy(np.stack([data.val.arrays[w.source][w.offset : w.offset + 33] for w in windows]).astype(np.int64))
    with torch.no_grad():
        expected = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).item()
    for training in (True, False):
        model.train(training)
        score = evaluate(model, data.val.arrays, windows, data.token_bytes, 4, CPU, torch.float32)
        assert model.training == training
        assert score.loss == pytest.approx(expected, abs=1e-5)
    unigram = unigram_baseline(data, windows)
    assert unigram.tokens == score.tokens and unigram.bytes == score.bytes and unigram.loss > 0


def test_every_process_runs_the_same_passes_and_padding_counts_zero(tokens: Path, monkeypatch) -> None:
    """3 windows for 2 processes: each process runs 2 forward passes (a rank that ran fewer would leave
    the others waiting in a collective), and the padding window adds nothing to the totals."""
    import minigpt.evaluate as evaluate_module

    data = TokenData(tokens)
    model = toy_model(data.vocab_size)
    windows = eval_windows(data.val, 32, 96)
    assert len(windows) == 3
    monkeypatch.setattr(evaluate_module.dist, "all_reduce", lambda t: None)  # each rank's own totals
    calls, forward = [], model.forward
    model.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    totals = []
    for rank in (0, 1):
        calls.clear()
        score = evaluate(model, data.val.arrays, windows, data.token_bytes, 1, CPU, torch.float32, Dist(rank, 2))
        totals.append((len(calls), score.tokens, score.loss * score.tokens, score.bytes))
    whole = evaluate(model, data.val.arrays, windows, data.token_bytes, 1, CPU, torch.float32)
    assert totals[0][0] == totals[1][0] == 2
    assert totals[0][1] + totals[1][1] == whole.tokens == 96
    assert totals[0][2] + totals[1][2] == pytest.approx(whole.loss * whole.tokens, rel=1e-6)
    assert totals[0][3] + totals[1][3] == whole.bytes


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_each_target_is_scored_with_the_context_its_window_gives(stride: int) -> None:
    """Against a plain forward per target: the loss of token p is the model's on the window's tokens
    before p (at least block - stride of them, once past the first window)."""
    model = toy_model(50, block=8).eval()
    torch.manual_seed(1)
    stream = torch.randint(0, 50, (30,)).numpy()
    windows = sliding_windows(len(stream), 8, stride)
    per_token = [np.full(len(stream), np.nan, dtype=np.float32)]
    score = evaluate(model, [stream], windows, np.ones(50, dtype=np.int64), 3, CPU, torch.float32,
                     per_token=per_token)
    for w in windows:
        for p in range(w.offset + 1 + w.skip, w.offset + w.length):
            with torch.no_grad():
                logits = model(torch.from_numpy(stream[w.offset : p]).long()[None]).logits[0, -1]
            expected = F.cross_entropy(logits[None], torch.tensor([int(stream[p])])).item()
            assert per_token[0][p] == pytest.approx(expected, abs=1e-5), (w, p)
    assert np.isnan(per_token[0][0]) and not np.isnan(per_token[0][1:]).any()
    assert score.tokens == 29 and score.loss == pytest.approx(float(per_token[0][1:].mean()), abs=1e-6)
