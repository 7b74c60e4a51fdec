"""The model and generation: causality, KV cache vs the plain reference, sampling rules, sizes."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import ModelConfig, Sampling, model_config
from minigpt.engine import draw_noise, next_token, slide_keep
from minigpt.generate import Decoder, generate, generate_many, generate_reference
from minigpt.model import GPT, KVCache
from minigpt.utils import UserError


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=64) | kw
    return GPT(ModelConfig(**cfg)).eval()


HEADS = [pytest.param({}, id="mha"), pytest.param({"n_kv_head": 2}, id="gqa")]  # 4 query heads, 2 key/value heads


@pytest.mark.parametrize("kw", [{"mlp": "swiglu"}, {"mlp": "gelu"}, {"n_kv_head": 1}])
def test_future_tokens_do_not_change_earlier_logits(kw: dict) -> None:
    model = small(**kw)
    x = torch.randint(0, 97, (3, 48))
    y = x.clone()
    y[:, 30:] = torch.randint(0, 97, (3, 18))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-3  # and later positions do see the change


@pytest.mark.parametrize("heads", HEADS)
def test_kv_cache_greedy_matches_reference(heads: dict) -> None:
    model = small(tie_embeddings=False, **heads)  # a random tied model greedily repeats its last token: too easy
    prompt = [5, 17, 3, 88, 42, 7]
    fast = generate(model, prompt, 40, Sampling(temperature=0), rows=3)
    ref = generate_reference(model, prompt, 40, Sampling(temperature=0), rows=3)
    assert fast == ref and len(fast[0]) == 40


def test_kv_cache_sampling_matches_reference_with_the_same_seed() -> None:
    model = small()
    s = Sampling(temperature=1.1, top_k=20, top_p=0.9, repetition_penalty=1.3)
    assert generate(model, [1, 2, 3], 30, s, rows=4, seed=7) == generate_reference(model, [1, 2, 3], 30, s, rows=4, seed=7)
    assert generate(model, [1, 2, 3], 30, s, rows=4, seed=7) != generate(model, [1, 2, 3], 30, s, rows=4, seed=8)


def test_prompts_of_different_lengths_in_one_batch_match_each_alone() -> None:
    """Each row keeps its own position: its greedy tokens are those of its prompt alone, within the context
    (against the reference) and past it, where each row slides its own context when it fills up (the
    penalty and untied head keep greedy off trivial repeats, so a leak between rows would show)."""
    model = small(tie_embeddings=False)
    prompts = [[5, 17, 3, 88, 42, 7], [9], list(range(1, 21)), list(range(30, 90))]  # the last > context (48)
    s = Sampling(temperature=0, repetition_penalty=1.5)
    batched = generate_many(model, prompts[:3], 25, s, rows=2)
    assert batched == [generate_reference(model, p, 25, s, rows=2) for p in prompts[:3]]
    long = generate_many(model, prompts, 90, s)  # every row slides, each at its own step
    assert [len(r[0]) for r in long] == [90] * 4
    assert long == [[generate(model, p, 90, s)[0]] for p in prompts]
    assert generate_many(model, prompts, 0, s) == [[[]]] * 4
    with pytest.raises(UserError, match="prompt is empty"):
        generate_many(model, [[1], []], 5, s)


@pytest.mark.parametrize("heads", HEADS)
def test_every_decode_step_gives_the_logits_of_its_window(heads: dict) -> None:
    """The Decoder's logits at every step equal a plain forward over the tokens its row holds: the whole
    sequence within the context, then, past it, the last 3/4 of a context after each slide, growing by one
    token a step until the next slide. Logits, not argmax: a position or window that is off by one shows."""
    model = small(tie_embeddings=False, **heads)
    T, prompts = model.cfg.block_size, [list(range(1, 41)), [7, 8, 9]]
    dec = Decoder(model, 2, 70, Sampling(temperature=0.9, top_k=40), gen=torch.Generator().manual_seed(3), graph=False)
    captured, decode, prefill = [], model.decode, model.prefill
    model.decode = lambda tok, pos, cache: captured.append(decode(tok, pos, cache)) or captured[-1]
    model.prefill = lambda idx, cache, last=None: (  # the first token's logits; a slide's prefill has none
        captured.append(prefill(idx, cache, last)) or captured[-1] if last is not None else prefill(idx, cache))
    try:
        out = dec.run(prompts).tolist()
    finally:
        del model.decode, model.prefill
    keep = slide_keep(T)
    assert keep == 36 and len(captured) == 70
    for row, prompt in enumerate(prompts):
        seq = prompt + out[row]
        for t in range(70):
            before = len(prompt) + t  # tokens before token t
            window = before if before <= T else keep + (before - T - 1) % (T - keep + 1)
            with torch.no_grad():
                expected = model(torch.tensor([seq[before - window : before]])).logits[0, -1]
            torch.testing.assert_close(captured[t][row], expected, rtol=1e-4, atol=1e-4, msg=f"row {row} token {t}")


@pytest.mark.parametrize("heads", HEADS)
def test_cache_prefill_in_chunks_equals_one_forward(heads: dict) -> None:
    model = small(**heads)
    x = torch.randint(0, 97, (2, 40))
    cache = KVCache(model.cfg, 2, 48, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        parts = [model(x[:, :15], cache=cache).logits, model(x[:, 15:16], cache=cache).logits,
                 model(x[:, 16:], cache=cache).logits]
        full = model(x).logits
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads", HEADS)
def test_decode_step_matches_the_full_forward(heads: dict) -> None:
    """GPT.decode, one token at a time at a tensor position, gives the logits of the plain forward."""
    model = small(**heads)
    x = torch.randint(0, 97, (3, 48))
    cache = KVCache(model.cfg, 3, 48, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = model(x).logits
        last = model(x[:, :5], cache=cache, last_only=True).logits  # a prompt, then single tokens
        steps = [model.decode(x[:, t], torch.full((3,), t), cache) for t in range(5, 48)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], rtol=1e-4, atol=1e-5)
    assert last.shape == (3, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, 4], rtol=1e-4, atol=1e-5)


def test_decode_step_traces_whole_with_no_host_sync() -> None:
    """The per-token step compiles as one graph: no graph break, so no read-back to the host and no
    data-dependent shape, which is what a CUDA graph capture needs (the capture itself is tested on GPU)."""
    torch._dynamo.reset()
    model = small()
    for s in (Sampling(temperature=0), Sampling(temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.2)):
        dec = Decoder(model, 2, 30, s, eot=96, gen=torch.Generator().manual_seed(0), graph=False)
        dec.step_fn = torch.compile(dec._step, fullgraph=True, dynamic=False, backend="eager")
        out = [r[: r.index(96)] if 96 in r else r for r in dec.run([[1, 2, 3]] * 2).tolist()]
        assert out == generate_reference(model, [1, 2, 3], 30, s, rows=2, eot=96, seed=0)


@pytest.mark.slow
def test_compiled_decode_step_matches_reference() -> None:
    """`--compile` through inductor (on CPU here; on CUDA the same step then goes into the graph)."""
    torch._dynamo.reset()
    model = small()
    fast = generate(model, [1, 2, 3], 60, Sampling(temperature=0), rows=2, graph=False, compile=True)  # slides past 48
    assert [r[:40] for r in fast] == generate_reference(model, [1, 2, 3], 40, Sampling(temperature=0), rows=2)
    assert fast == generate(model, [1, 2, 3], 60, Sampling(temperature=0), rows=2, graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_graph_decoding_matches_reference(compile: bool, heads: dict) -> None:
    model = small(**heads).cuda()
    prompt = [5, 17, 3, 88, 42, 7]
    for s, seed in ((Sampling(temperature=0), 0), (Sampling(temperature=1.0, top_k=30), 5)):
        fast = generate(model, prompt, 100, s, rows=4, seed=seed, graph=True, compile=compile)  # slides past 48
        eager = generate(model, prompt, 100, s, rows=4, seed=seed, graph=False)
        ref = generate_reference(model, prompt, 40, s, rows=4, seed=seed)
        assert fast == eager and [r[:40] for r in fast] == ref
        prompts = [prompt, [3], list(range(1, 30))]  # left-padded rows: the padding mask in the graph
        assert (generate_many(model, prompts, 60, s, 2, seed=seed, graph=True, compile=compile)
                == generate_many(model, prompts, 60, s, 2, seed=seed, graph=False))
    assert generate(model, prompt, 1, Sampling(temperature=0), graph=True) == generate_reference(
        model, prompt, 1, Sampling(temperature=0))  # a one-token buffer survives the capture's warm-up


def test_generation_past_the_context_and_stop_at_eot() -> None:
    model = small()
    out = generate(model, [1, 2], 120, Sampling(temperature=0), rows=2)  # context is 48: slides
    assert len(out[0]) == 120
    first = generate(model, [1, 2], 10, Sampling(temperature=0))[0]
    stop = first[3]
    cut = generate(model, [1, 2], 10, Sampling(temperature=0), eot=stop)[0]
    assert cut == first[: first.index(stop)]
    assert generate(model, [1, 2], 0, Sampling(temperature=0), rows=2) == [[], []] == generate_reference(
        model, [1, 2], 0, Sampling(temperature=0), rows=2)


def test_sampling_rules() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    noise = lambda: draw_noise(logits.shape, logits.device, gen)  # noqa: E731
    assert next_token(logits, Sampling(temperature=0), None, None).item() == 1
    for _ in range(20):  # top_k=1 and a tiny top_p both leave only the best token
        assert next_token(logits, Sampling(temperature=1.0, top_k=1), None, noise()).item() == 1
        assert next_token(logits, Sampling(temperature=1.0, top_p=0.01), None, noise()).item() == 1
        assert next_token(logits, Sampling(temperature=1.0, top_k=2), None, noise()).item() in (1, 2)
    seen = torch.tensor([[False, True, False, False]])
    assert next_token(logits, Sampling(temperature=0, repetition_penalty=2.0), seen, None).item() == 2


def test_top_k_and_top_p_judge_the_tempered_distribution() -> None:
    """At temperature 0.5, logits (2, 1, 0) give p = (0.867, 0.117, 0.016): top-p 0.8 keeps the first token
    alone (at temperature 1, p = (0.665, 0.245, 0.090), it would keep two)."""
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    toks = next_token(logits, Sampling(temperature=0.5, top_p=0.8), None, draw_noise(logits.shape, logits.device, gen))
    assert set(toks.tolist()) == {0}
    toks = next_token(logits, Sampling(temperature=2.0, top_p=0.85), None, draw_noise(logits.shape, logits.device, gen))
    assert set(toks.tolist()) == {0, 1, 2}  # at T=2, p = (0.506, 0.307, 0.186): 0.85 needs all three
    # top-k after the temperature too: a cut at the k-th logit, and the kept tokens drawn at T
    toks = next_token(logits, Sampling(temperature=2.0, top_k=2), None, draw_noise(logits.shape, logits.device, gen))
    freq = torch.bincount(toks, minlength=3).float() / len(toks)
    expected = torch.tensor([1.0, 0.5]).exp() / torch.tensor([1.0, 0.5]).exp().sum()
    assert freq[2] == 0 and (freq[:2] - expected).abs().max() < 0.03


def test_sampling_draws_from_the_softmax() -> None:
    """The exponential race (argmax of p / Exp(1)) samples each token with its softmax probability."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5]).repeat(40_000, 1)
    gen = torch.Generator().manual_seed(1)
    for temperature in (1.0, 0.5):
        toks = next_token(logits, Sampling(temperature=temperature), None, draw_noise(logits.shape, logits.device, gen))
        freq = torch.bincount(toks, minlength=5).float() / len(toks)
        p = (logits[0] / temperature).softmax(-1)
        assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(toks)).sqrt().max()  # within 4 standard errors


def test_grouped_query_attention_is_attention_with_each_key_value_head_repeated() -> None:
    """A model with 2 key/value heads for 4 query heads gives the logits of an ordinary 4-head model whose
    key and value heads are copies, 0 0 1 1 (query heads 0 and 1 share KV head 0); its cache holds 2 heads."""
    gqa = small(n_kv_head=2, tie_embeddings=False)
    mha = small(tie_embeddings=False)
    state = gqa.state_dict()
    for i in range(2):
        qkv = state[f"blocks.{i}.attn.qkv.weight"]  # rows: q (4 heads x 16), k (2 x 16), v (2 x 16)
        q, k, v = qkv.split((64, 32, 32))
        repeat = lambda w: w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # noqa: E731
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, repeat(k), repeat(v)))
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, atol=1e-5)
    cache = KVCache(gqa.cfg, 2, 48, torch.device("cpu"), torch.float32)
    assert cache.k.shape == (2, 2, 2, 48, 16)
    assert gqa.num_params() == mha.num_params() - 2 * 2 * 32 * 64
    with pytest.raises(UserError, match="must divide"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_llama3_rope_scaling_keeps_high_frequencies_and_slows_low_ones() -> None:
    """Llama 3's frequencies: wavelengths under original / high_freq_factor as they were, over original /
    low_freq_factor divided by `factor`, a smooth blend between (transformers' values are checked in export)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    plain, scaled = small(), small(rope_scaling=scaling)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2) / 16))
    wavelen = 2 * torch.pi / inv
    angle = lambda m: torch.atan2(m.sin[1], m.cos[1])  # noqa: E731  position 1: the frequencies themselves
    short, long = wavelen < 16, wavelen > 64
    assert short.any() and long.any() and (~short & ~long).any()  # all three bands occur at head size 16
    torch.testing.assert_close(angle(scaled)[short], angle(plain)[short])
    torch.testing.assert_close(angle(scaled)[long], angle(plain)[long] / 8)
    mid = ~short & ~long
    assert ((angle(scaled)[mid] < angle(plain)[mid]) & (angle(scaled)[mid] > angle(plain)[mid] / 8)).all()
    with pytest.raises(UserError, match="rope_scaling"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_weight_tying_init_and_presets() -> None:
    tied, untied = small(), small(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 97 * 64
    std = tied.blocks[0].attn.proj.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # 0.02 / sqrt(2 * n_layer), n_layer = 2
    assert 23.0e6 < GPT(model_config("medium", 8192, {})).num_params() < 24.0e6
    with torch.device("meta"):
        assert 123e6 < GPT(model_config("gpt2", 50257, {})).num_params() < 125e6


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randint(0, 97, (2, 33))
    grads = []
    for flag in (False, True):
        model = small().train()
        model.grad_checkpoint = flag
        model(x[:, :-1], x[:, 1:]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
