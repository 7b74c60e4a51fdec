"""The engine, with no server: the per-row sampler against the one-setting one, the text stream, and
continuous batching on an untrained model against plain generation, token for token."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from minigpt.config import ModelConfig, Sampling
from minigpt.data import token_byte_lengths
from minigpt.engine import Engine, RowSampling, Sequence, TextStream, next_token, next_token_rows
from minigpt.generate import generate
from minigpt.model import GPT

GREEDY = Sampling(temperature=0.0)
EOT = 0


@pytest.fixture(scope="module", params=[0, 1], ids=["mha", "gqa"])
def model(request: pytest.FixtureRequest) -> GPT:
    """Random weights, context 32 (rows slide often); the differences between logits are small, so a
    context mix-up changes tokens. Also with one key/value head for the two query heads."""
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32,
                           n_kv_head=request.param)).eval()


def prompt(n: int, seed: int) -> list[int]:
    """A document start and n - 1 random tokens."""
    g = torch.Generator().manual_seed(seed)
    return [EOT, *torch.randint(1, 300, (n - 1,), generator=g).tolist()]


def test_next_token_rows_gives_each_row_what_next_token_gives_it_alone() -> None:
    """Rows with different settings in one batch: each gets exactly the token the one-setting sampler gives
    it with the same noise (temperatures that are powers of two keep the division exact). Twice: every rule
    in use, and a batch whose flags let the sampler skip top-k, top-p and the penalty."""
    torch.manual_seed(0)
    mixed = [Sampling(0.0), Sampling(1.0), Sampling(0.5, top_k=5), Sampling(2.0, top_p=0.6),
             Sampling(1.0, top_k=3, top_p=0.9, repetition_penalty=1.3), Sampling(0.0, repetition_penalty=2.0),
             Sampling(1.0, top_p=0.3), Sampling(1e-40)]
    plain = [Sampling(0.0), Sampling(1.0), Sampling(0.5), Sampling(4.0)]
    vocab = 50
    for settings in (mixed, plain):
        rows = len(settings)
        for trial in range(20):
            logits = torch.randn(rows, vocab) * 3
            seen = torch.rand(rows, vocab) < 0.2
            noise = torch.empty(rows, vocab).exponential_()
            s = RowSampling(torch.tensor([x.temperature for x in settings]), torch.tensor([x.top_k for x in settings]),
                            torch.tensor([x.top_p for x in settings]),
                            torch.tensor([x.repetition_penalty for x in settings]),
                            max_k=max(x.top_k for x in settings), any_top_p=any(x.top_p < 1 for x in settings),
                            any_sampled=True)
            penalised = any(x.repetition_penalty != 1 for x in settings)
            got = next_token_rows(logits, s, seen if penalised else None, noise)
            want = [int(next_token(logits[r : r + 1], x, seen[r : r + 1], noise[r : r + 1]))
                    for r, x in enumerate(settings)]
            assert got.tolist() == want, (trial, settings)
            if settings is mixed:  # a temperature below the floor is greedy, not NaN
                assert want[-1] == int(logits[-1].argmax())


def test_text_stream_holds_back_split_characters_and_stop_strings() -> None:
    """Tokens are bytes here: a Cyrillic letter comes in two tokens, a stop string across several."""

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def run(text: str, stops: list[str]) -> tuple[list[str], str, bool]:
        ts = TextStream(decode, stops)
        pieces = [ts.push(b) for b in text.encode()]
        pieces.append(ts.finish())
        return pieces, ts.completion, ts.stopped

    pieces, completion, stopped = run("Сәлам, дөнья! END more", ["END"])
    assert completion == "Сәлам, дөнья! " and stopped and "".join(pieces) == completion
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "С"  # sent as soon as its second byte came, not held for the stop string
    pieces, completion, stopped = run("abc EN", ["END"])  # a stop string's start at the end is text after all
    assert completion == "abc EN" and not stopped and pieces[-1] == "EN"
    pieces, completion, _ = run("xx\n\nyy", ["\n\n", "yy"])  # the earliest stop wins
    assert completion == "xx"
    _, completion, stopped = run("ENDING", ["ING", "END"])
    assert completion == "" and stopped


def run_engine(model: GPT, seqs: list[tuple[list[int], int, Sampling]], slots: int, seed: int | None = None,
               stagger: bool = False, eot: int = EOT) -> tuple[list, dict, list]:
    """Submit (ids, max_new, sampling) sequences (sequence i seeded with seed + i when `seed` is given); all at
    once before the engine starts, or (`stagger`) one by one while it runs, so that some join a running
    batch. Returns their tokens, finish reasons, and the order in which their first tokens came."""
    got: list[list[int]] = [[] for _ in seqs]
    ends: dict[int, str] = {}
    order: list[int] = []
    done = threading.Event()

    def emitter(i: int):
        def emit(tok: int | None, reason: str | None) -> None:
            if tok is not None:
                if not got[i]:
                    order.append(i)
                got[i].append(tok)
            else:
                ends[i] = reason
                if len(ends) == len(seqs):
                    done.set()
        return emit

    engine = Engine(model, eot, slots=slots, max_queue=len(seqs))
    made = [Sequence(ids, n, s, None if seed is None else seed + i, emitter(i)) for i, (ids, n, s) in enumerate(seqs)]
    if not stagger:
        engine.submit(made)
    engine.start()
    try:
        for i, seq in enumerate(made if stagger else []):
            engine.submit([seq])
            time.sleep(0.01 * (i % 3))  # some join a running batch, some arrive together
        assert done.wait(60)
    finally:
        engine.close()
    return got, ends, order


def test_engine_joins_and_slides_give_every_sequence_its_lone_tokens(model: GPT) -> None:
    """Sequences of different lengths and sampling settings join the engine while others run (3 slots for 7
    sequences), some run past the context (rows slide): each gets exactly the tokens plain generation gives
    it alone with its seed (the same draws from the same generator, so sampled tokens must match too)."""
    T = model.cfg.block_size
    prompts = [prompt(n, i) for i, n in enumerate((3, 12, 31, 1, 5, 20, 30))]
    max_new = [70, 5, 12, 40, 3, 66, 20]
    settings = [Sampling(1.0), GREEDY, Sampling(0.5, top_k=8), Sampling(1.0, top_p=0.8), Sampling(2.0),
                Sampling(1.0, top_k=20, repetition_penalty=1.5), Sampling(0.0, repetition_penalty=2.0)]
    seqs = list(zip(prompts, max_new, settings, strict=True))
    got, ends, _ = run_engine(model, seqs, slots=3, seed=100, stagger=True)
    assert sum(len(ids) + len(g) > T for (ids, _, _), g in zip(seqs, got, strict=True)) >= 2  # rows slid
    for i, (ids, n, s) in enumerate(seqs):
        want = generate(model, ids, n, s, eot=EOT, seed=100 + i)[0]
        assert got[i][: len(want)] == want, i
        assert ends[i] == ("stop" if got[i][-1] == EOT else "length"), i  # the end token ends it, even last
    assert sum(len(set(g)) for g in got) > 40  # varied tokens: a context mix-up would show


def test_engine_serves_first_come_first_and_an_end_token_at_the_limit_is_a_stop(model: GPT) -> None:
    ids = [prompt(n, 50 + n) for n in (1, 3, 7, 2, 9)]
    got, ends, order = run_engine(model, [(i, 6, GREEDY) for i in ids], slots=1)
    assert order == list(range(len(ids)))  # one slot: in the order they came
    # the end token: one that a seeded draw gives at step 10 or later of the first prompt and not before
    sampled = Sampling(1.0)
    cont = generate(model, ids[0], 30, sampled, seed=5)[0]
    at = next(k for k in range(10, 30) if cont[k] not in cont[:k])
    got, ends, _ = run_engine(model, [(ids[0], at + 1, sampled)], slots=1, seed=5, eot=cont[at])
    assert got[0] == cont[: at + 1] and ends[0] == "stop"  # the end token is its last token: a stop
    got, ends, _ = run_engine(model, [(ids[0], at, sampled)], slots=1, seed=5, eot=cont[at])
    assert got[0] == cont[:at] and ends[0] == "length"


def test_a_sentencepiece_decoder_keeps_the_spaces_between_streamed_tokens() -> None:
    """Llama 2's and TinyLlama's decoders drop the leading space of a text decoded alone: the stream decodes
    each piece after the token before it, and the byte count reads "\u2581" as the space it is."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordLevel({"\u2581Hello": 0, "\u2581world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    assert decode([1]) == "world" and decode([0, 1, 1, 2]) == "Hello world world!"
    stream = TextStream(decode, [])
    assert "".join(stream.push(t) for t in (0, 1, 1, 2)) + stream.finish() == "Hello world world!"
    assert token_byte_lengths(tok).tolist()[:3] == [6, 6, 1]
