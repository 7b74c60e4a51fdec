"""A run on little text: the rules that fit it to the data (plan.fit_to_data), the way back to its best
point when val stops improving, and what it says when the model ends no better than a unigram model.
The rules' decisions are checked on a 20 KB cut of tatar_cv.txt, the size the issue was found at."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import MODEL, ctrl_c_during, losses, metrics, shared_corpus, train_cfg

from minigpt.checkpoint import load_model
from minigpt.config import RECIPES, PrepareConfig, TokenizerConfig, TrainConfig, model_config
from minigpt.corpus import prepare
from minigpt.data import TokenData
from minigpt.evaluate import Score, no_better_than_unigram
from minigpt.model import GPT, weight_count
from minigpt.plan import EPOCH_BUDGET, PATIENCE, SMALL_DATA_DROPOUT, TOKENS_PER_WEIGHT, fit_to_data
from minigpt.resume import TrainerState
from minigpt.tokenizer import build
from minigpt.train import Trainer, train

CPU = torch.device("cpu")
PIPELINE_GIVES = {"data", "name", "runs_dir", "device", "recipe"}  # what run_pipeline.sh passes to 03_train.py


@pytest.fixture(scope="module")
def tatar_20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20 KB of tatar_cv.txt (whole lines), prepared and tokenized as the pipeline does (vocab sized
    to the corpus)."""
    tmp = tmp_path_factory.mktemp("tatar20k")
    text = shared_corpus("tatar_cv.txt").read_bytes()[:20_000]
    (tmp / "tt20k.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    data_dir, _ = prepare(PrepareConfig(inputs=[str(tmp / "tt20k.txt")], name="tt20k", out_dir=str(tmp / "data")))
    return build(TokenizerConfig(data=str(data_dir), vocab_size=0)).out


def pipeline_cfg(tokens: Path, runs: Path, **kw) -> TrainConfig:
    """03_train.py as run_pipeline.sh runs it on a CPU: the cpu recipe."""
    return TrainConfig(**(RECIPES["cpu"] | dict(recipe="cpu", data=str(tokens), runs_dir=str(runs), device="cpu") | kw))


def test_20kb_of_tatar_fires_every_rule(tatar_20k: Path, tmp_path: Path) -> None:
    data = TokenData(tatar_20k)
    cfg = pipeline_cfg(tatar_20k, tmp_path)
    fitted = fit_to_data(cfg, {}, PIPELINE_GIVES, data.train.tokens, data.vocab_size, CPU)
    assert 5_000 < data.train.tokens < 7_000 and len(fitted.rules) == 6, fitted.rules
    mcfg = model_config(cfg.preset, data.vocab_size, fitted.overrides)
    weights = weight_count(mcfg)
    assert weights < weight_count(model_config("tiny", data.vocab_size, {})) / 4  # a far smaller model
    assert mcfg.dropout == SMALL_DATA_DROPOUT and mcfg.block_size == 128
    per_epoch = math.ceil(data.train.tokens / (16 * 128))
    assert fitted.cfg.eval_every == per_epoch and fitted.cfg.patience == PATIENCE
    assert fitted.cfg.max_epochs == EPOCH_BUDGET
    # only those options: the batch, the schedule and the time budget stay the recipe's
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(fitted.cfg, f.name)}
    assert changed == {"eval_every", "patience", "max_epochs", "sample_every", "save_every"}
    assert fitted.cfg.sample_every == fitted.cfg.save_every == cfg.eval_every  # kept at the recipe's cadence
    said = " ".join(" ".join(fitted.rules).split())
    for fragment in (f"{data.train.tokens:,} train tokens", "--no-fit-data", f"{mcfg.n_layer} layers x {mcfg.n_embd} wide",
                     "--preset", f"budget {EPOCH_BUDGET} epochs", f"evaluate every {per_epoch} steps", "--eval-every",
                     f"patience {PATIENCE} evaluations", "--patience 0", "--dropout 0"):
        assert fragment in said, fragment


def test_an_option_given_wins_over_its_rule(tatar_20k: Path, tmp_path: Path) -> None:
    data = TokenData(tatar_20k)

    def fit(given: set[str], overrides: dict | None = None, **kw):
        cfg = pipeline_cfg(tatar_20k, tmp_path, **kw)
        return cfg, fit_to_data(cfg, overrides or {}, PIPELINE_GIVES | given, data.train.tokens, data.vocab_size, CPU)

    cfg, fitted = fit({"preset", "eval_every", "patience", "max_epochs"}, {"dropout": 0.0},
                      preset="tiny", eval_every=300, patience=0, max_epochs=0.0)
    assert fitted.cfg == cfg and fitted.overrides == {"dropout": 0.0}
    assert len(fitted.rules) == 1  # only the line that says the data is small
    _, fitted = fit({"n_embd"}, {"n_embd": 64})  # one shape option given: the shape is the user's
    assert "n_layer" not in fitted.overrides and fitted.overrides["n_embd"] == 64
    _, fitted = fit({"n_kv_head"}, {"n_kv_head": 2})  # key/value heads that only the preset's 4 heads divide
    assert "n_head" not in fitted.overrides and fitted.overrides["n_kv_head"] == 2
    cfg, fitted = fit(set(), fit_data=False)
    assert fitted.cfg == cfg and fitted.overrides == {} and fitted.rules == []
    # from Python (given None): an option that differs from the default counts as given
    cfg = pipeline_cfg(tatar_20k, tmp_path, eval_every=7)
    assert fit_to_data(cfg, {}, None, data.train.tokens, data.vocab_size, CPU).cfg.eval_every == 7


def test_a_run_that_reads_its_data_a_few_times_is_left_as_it_is(tatar_20k: Path, tmp_path: Path) -> None:
    data = TokenData(tatar_20k)
    epochs4 = 4 * data.train.tokens // (16 * 128)  # four epochs of the recipe's batch: not small data yet
    cfg = pipeline_cfg(tatar_20k, tmp_path, max_steps=epochs4)
    assert fit_to_data(cfg, {}, PIPELINE_GIVES, data.train.tokens, data.vocab_size, CPU).rules == []
    cfg = dataclasses.replace(cfg, max_steps=epochs4 + 2)
    assert fit_to_data(cfg, {}, PIPELINE_GIVES, data.train.tokens, data.vocab_size, CPU).rules != []


def test_the_shape_rule_keeps_enough_tokens_per_weight(tatar_20k: Path, tmp_path: Path) -> None:
    """The largest smaller shape with TOKENS_PER_WEIGHT train tokens per weight; none when the preset has them."""
    data = TokenData(tatar_20k)
    cfg = pipeline_cfg(tatar_20k, tmp_path, max_steps=10**7, max_minutes=0.0)  # small data at every size below
    tiny = weight_count(model_config("tiny", data.vocab_size, {}))
    shapes = {}
    for tokens in (data.train.tokens, 8 * data.train.tokens, int(TOKENS_PER_WEIGHT * tiny) + 1):
        fitted = fit_to_data(cfg, {}, PIPELINE_GIVES, tokens, data.vocab_size, CPU)
        assert len(fitted.rules) > 1, fitted.rules
        shapes[tokens] = fitted.overrides.get("n_embd")
        weights = weight_count(model_config("tiny", data.vocab_size, fitted.overrides))
        assert tokens >= TOKENS_PER_WEIGHT * weights or shapes[tokens] == 64  # the smallest, when none has them
    # 20 KB: the smallest shape; 8 times that: a middle one; enough tokens for tiny: tiny as it is
    assert list(shapes.values()) == [64, 96, None], shapes


# --------------------------------------------------------------------------------------------------
# the way back to the best point


def scripted(monkeypatch: pytest.MonkeyPatch, val: dict[int, float]) -> None:
    """Val losses by step (later steps: the last one), so that the patience runs out where the test says
    while training itself stays real."""
    def score(self, windows):
        loss = val.get(self.step, list(val.values())[-1])
        return Score(loss, loss / math.log(2), 100, 100)
    monkeypatch.setattr(Trainer, "_score", score)


VAL = {2: 5.0, 4: 4.0, 6: 4.5, 8: 4.6, 10: 3.0}  # best at step 4; out of patience (2) at step 8; decayed: better


def test_out_of_patience_the_run_goes_back_to_its_best_weights_and_decays_there(tokens: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, VAL)
    seen = {}
    rewind = Trainer.rewind

    def checked(self) -> bool:
        went = rewind(self)
        best, _ = load_model(self.run_dir / "best")
        seen["equal"] = all(torch.equal(a, b) for a, b in zip(self.raw_model.state_dict().values(),
                                                               best.state_dict().values(), strict=True))
        saved = torch.load(self.run_dir / "best" / "optimizer.pt", weights_only=True)["state"]  # AdamW alone
        now = self.optimizer.adamw.state_dict()["state"]
        seen["optimizer"] = bool(saved) and all(torch.equal(now[k]["exp_avg"], v["exp_avg"]) for k, v in saved.items())
        seen["moved"] = went
        return went
    monkeypatch.setattr(Trainer, "rewind", checked)
    cfg = train_cfg(tokens, tmp_path, max_steps=100, eval_every=2, patience=2, warmup_steps=1, lr=3e-3)
    summary = train(cfg, MODEL)
    assert seen == {"equal": True, "optimizer": True, "moved": True}
    decay = math.ceil(cfg.cooldown * 4)  # --cooldown's share of the 4 steps up to the best point
    assert summary["steps"] == 8 + decay and "out of patience at step 8, then decayed from the best point (step 4)" \
        in summary["stop_reason"]
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "run") if "lr" in r}
    assert lrs[8] == pytest.approx(3e-3)  # before going back: the peak
    # linear towards 0 (--min-lr-ratio), which the step after the decay would reach
    assert [lrs[s] for s in range(9, 9 + decay)] == pytest.approx([3e-3 * (decay - i) / (decay + 1) for i in range(decay)])
    state = TrainerState.from_dict(json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text()))
    assert (state.best_step, state.decay_from, state.decay_steps) == (8 + decay, 8, decay)
    # the decayed model scored better: best/ holds it
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["step"] == 8 + decay


def test_without_a_high_rate_at_the_best_point_the_run_just_stops(tokens: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Best in the warmup (the rate still low): nothing to decay, the run stops as --patience always did."""
    scripted(monkeypatch, {2: 4.0, 4: 4.5, 6: 4.6})
    summary = train(train_cfg(tokens, tmp_path, max_steps=100, eval_every=2, patience=2, warmup_steps=10), MODEL)
    assert summary["steps"] == 6 and "no better val loss in 2 evaluations" in summary["stop_reason"]


def test_the_decay_stays_linear_while_it_improves_val(tokens: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Best at step 20, out of patience at 24, then a decay of ceil(0.3 x 20) = 6 steps that improves val at
    every evaluation: each improvement moves the best point on, never the decay's peak."""
    scripted(monkeypatch, {**{s: 5.0 - s / 100 for s in range(2, 21, 2)}, 22: 5.5, 24: 5.6, 26: 4.0, 28: 3.9, 30: 3.8})
    summary = train(train_cfg(tokens, tmp_path, max_steps=100, eval_every=2, patience=2, warmup_steps=1, lr=3e-3),
                    MODEL)
    assert summary["steps"] == 30 and summary["best_val_loss"] == 3.8
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "run") if "lr" in r}
    assert [lrs[s] for s in range(25, 31)] == pytest.approx([3e-3 * (6 - i) / 7 for i in range(6)])


class Killed(BaseException):
    """A kill in the middle of a step: nothing is saved."""


def test_a_run_killed_during_the_decay_resumes_into_it(tokens: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """last/ is saved at the step that goes back, whatever --save-every says: killed after the decay saved a
    better best/, the run resumes into the decay (from an earlier last/ it could no longer go back)."""
    val = {**{s: 5.0 - s / 100 for s in range(2, 21, 2)}, 22: 5.5, 24: 5.6, 26: 4.0, 28: 3.9, 30: 3.8}
    base = dict(max_steps=100, eval_every=2, save_every=10, patience=2, warmup_steps=1, lr=3e-3)
    scripted(monkeypatch, val)
    train(train_cfg(tokens, tmp_path / "whole", **base), MODEL)
    forward, calls = GPT.forward, [0]

    def killed_at_27(self, idx, targets=None, cache=None, last_only=False):
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] == 27:  # after best/ was saved at step 26, in the decay
                raise Killed
        return forward(self, idx, targets, cache, last_only)
    monkeypatch.setattr(GPT, "forward", killed_at_27)
    with pytest.raises(Killed):
        train(train_cfg(tokens, tmp_path / "split", **base), MODEL)
    monkeypatch.setattr(GPT, "forward", forward)
    summary = train(train_cfg(tokens, tmp_path / "split", resume=True, **base), MODEL)
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")
    assert summary["steps"] == 30 and "decayed from the best point (step 20)" in summary["stop_reason"]


def test_no_going_back_where_the_budget_ends_first(tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decay that would not fit in --max-steps, or patience that runs out at the last step (whose schedule
    has decayed already): the run stops as --patience always did."""
    scripted(monkeypatch, VAL)
    for max_steps in (9, 8):
        summary = train(train_cfg(tokens, tmp_path / str(max_steps), max_steps=max_steps, eval_every=2, patience=2,
                                  warmup_steps=1, lr=3e-3), MODEL)
        assert summary["steps"] == 8 and "no better val loss in 2 evaluations" in summary["stop_reason"], summary


@pytest.mark.parametrize("step", [8, 9], ids=["at-the-evaluation-out-of-patience", "in-the-decay"])
def test_a_run_stopped_by_ctrl_c_around_the_decay_resumes_exactly(tokens: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C during step 8 (whose evaluation runs out of patience) or step 9 (the first of the decay), then
    --resume: the uninterrupted run's losses."""
    scripted(monkeypatch, VAL)
    base = dict(max_steps=100, eval_every=2, patience=2, warmup_steps=1, lr=3e-3)
    train(train_cfg(tokens, tmp_path / "whole", **base), MODEL)
    ctrl_c_during(monkeypatch, step)
    train(train_cfg(tokens, tmp_path / "split", **base), MODEL)
    monkeypatch.undo()
    scripted(monkeypatch, VAL)
    summary = train(train_cfg(tokens, tmp_path / "split", resume=True, **base), MODEL)
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")
    assert "decayed from the best point (step 4)" in summary["stop_reason"]


# --------------------------------------------------------------------------------------------------
# the closing message


def fake_run(tmp_path: Path, train_loss: float, val: list[tuple[int, float]], steps: int) -> Path:
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    records = [{"step": s, "loss": train_loss} for s in range(1, steps + 1)]
    records += [{"step": s, "val_loss": v, "val_bpb": v / 2} for s, v in val]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    (run / "last" / "trainer_state.json").write_text(json.dumps({"step": steps, "tokens_seen": steps * 2048}))
    return run


def test_a_model_that_memorised_is_told_to_find_more_text_not_to_train_longer(tmp_path: Path) -> None:
    run = fake_run(tmp_path, 0.15, [(300, 6.27), (600, 7.06), (900, 7.45)], 900)
    said = no_better_than_unigram(run, 5_691, 3.1, 2.35)
    for fragment in ("5,691 train tokens read 323.9 times", "best at step 300 (epoch 108.0)", "memorised",
                     "More text", "--preset", "more steps would not"):
        assert fragment in said, said
    assert "train longer" not in said


def test_a_model_that_has_not_learnt_is_told_to_train_longer(tmp_path: Path) -> None:
    run = fake_run(tmp_path, 6.5, [(10, 6.4), (20, 6.3)], 20)
    said = no_better_than_unigram(run, 100_000, 3.2, 2.35)
    assert "not learnt yet" in said and "memorised" not in said
    assert no_better_than_unigram(tmp_path / "elsewhere", 100, 3.2, 2.35).endswith("(3.200 against 2.350 bits per byte).")
