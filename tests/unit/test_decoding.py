"""Decoding over a step function: greedy, beam search, sampling, parameter checks.

Toy language models make the right answer known: the state carried in `h` is the
prefix generated so far, and a table gives the next-token distribution per prefix."""

import numpy as np
import pytest
import torch

from captioner.checkpoint import load
from captioner.decoding import (
    MAX_BEAM,
    MAX_LENGTH,
    DecodeParams,
    Hypothesis,
    beam_search,
    decode,
    greedy,
    sample,
    texts,
    torch_step,
)
from captioner.model import CaptionModel, ModelArgs

START, END, A, B, C, D = range(6)
V = 6
EPS = 1e-12


class ToyLM:
    """next-token probabilities = table(prefix); unlisted tokens get ~0."""

    def __init__(self, table):
        self.table = table
        self.prefixes: list[tuple[int, ...]] = [()]
        self.index = {(): 0}
        self.batch_sizes: list[int] = []

    def _id(self, prefix):
        if prefix not in self.index:
            self.index[prefix] = len(self.prefixes)
            self.prefixes.append(prefix)
        return self.index[prefix]

    def step(self, tokens, h, c):
        assert tokens.dtype == np.int64 and h.dtype == np.float32 and h.shape[0] == c.shape[0] == len(tokens)
        self.batch_sizes.append(len(tokens))
        logp = np.empty((len(tokens), V), np.float32)
        h2 = np.empty_like(h)
        for i, (tok, state) in enumerate(zip(tokens, h[:, 0])):
            prefix = self.prefixes[int(state)]
            if tok != START:
                prefix = prefix + (int(tok),)
            p = np.full(V, EPS)
            for t, q in self.table(prefix).items():
                p[t] = q
            logp[i] = np.log(p / p.sum())
            h2[i] = self._id(prefix)
        return logp, h2, c.copy()

    def start(self, n=1):
        return np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)


def greedy_trap(prefix):
    """Greedy takes A (0.55) and ends with 0.55 * 0.34; the best sequence is B END (0.45 * 0.9)."""
    return {
        (): {A: 0.55, B: 0.45},
        (A,): {C: 0.34, D: 0.33, END: 0.33},
        (B,): {END: 0.9, C: 0.1},
    }.get(prefix, {END: 1.0})


def test_toy_case_where_greedy_is_wrong_and_beam_is_right():
    lm = ToyLM(greedy_trap)
    g = greedy(lm.step, *lm.start(), START, END, max_length=10)[0]
    assert g.tokens == (A, C) and g.finished
    assert g.logprob == pytest.approx(np.log(0.55 * 0.34), abs=1e-5)
    for beam in (2, 3, 5):
        for alpha in (0.0, 0.7, 1.0):
            b = beam_search(ToyLM(greedy_trap).step, *lm.start(), START, END, beam, 10, alpha)[0]
            assert b.tokens == (B,) and b.finished, (beam, alpha)
            assert b.logprob == pytest.approx(np.log(0.45 * 0.9), abs=1e-5)


def long_or_short(prefix):
    """A END: log 0.5 in 2 tokens. B C C C END: log(0.5 * 0.9^3) in 5 tokens (lower total,
    higher per token). Other B-continuations keep the beam busy so END stays out of it."""
    if prefix == ():
        return {A: 0.5, B: 0.5}
    if prefix[0] == B and len(prefix) < 4:
        return {C: 0.9, D: 0.0999, END: 1e-4}
    return {END: 1.0}


@pytest.mark.parametrize("alpha, expected", [(0.0, (A,)), (0.3, (A,)), (0.7, (B, C, C, C)), (1.0, (B, C, C, C))])
def test_length_normalisation(alpha, expected):
    lm = ToyLM(long_or_short)
    h = beam_search(lm.step, *lm.start(), START, END, 2, 10, alpha)[0]
    assert h.tokens == expected and h.finished
    # score / length**alpha with END counted: 0.5 per 2 tokens vs 0.5 * 0.9**3 per 5
    short, long = np.log(0.5) / 2**alpha, np.log(0.5 * 0.9**3) / 5**alpha
    assert (short > long) == (expected == (A,))


def never_ends(prefix):
    return {A: 0.5, B: 0.3, C: 0.2 - 1e-6, END: 1e-6}


@pytest.mark.parametrize("beam", [1, 3])
def test_hypotheses_that_never_end_stop_at_max_length(beam):
    lm = ToyLM(never_ends)
    hyps = decode(lm.step, *lm.start(2), START, END, DecodeParams(beam_size=beam, max_length=7))
    for h in hyps:
        assert len(h.tokens) == 7 and not h.finished
        assert h.tokens == (A,) * 7
        assert h.logprob == pytest.approx(7 * np.log(0.5), abs=1e-4)
    assert len(lm.batch_sizes) == 7


def test_greedy_makes_one_batched_call_per_token():
    lm = ToyLM(lambda p: {(): {A: 0.6, END: 0.4}, (A,): {B: 0.9, END: 0.1}}.get(p, {END: 1.0}))
    hyps = greedy(lm.step, *lm.start(4), START, END, max_length=20)
    assert [h.tokens for h in hyps] == [(A, B)] * 4
    assert lm.batch_sizes == [4, 4, 4]  # A, B, END: all live rows in each call


def test_beam_search_batches_images_and_matches_one_at_a_time():
    torch.manual_seed(0)
    model = CaptionModel(ModelArgs(vocab_size=15)).eval()
    step = torch_step(model.decoder)
    h0 = torch.randn(5, 300).numpy() * 2
    calls = []

    def counting(tokens, h, c):
        calls.append(len(tokens))
        return step(tokens, h, c)

    together = beam_search(counting, h0, h0, 1, 2, 3, 12, 0.7)
    assert calls[0] == 5 and max(calls) <= 15 and len(calls) <= 12
    for i in range(5):
        alone = beam_search(step, h0[i : i + 1], h0[i : i + 1], 1, 2, 3, 12, 0.7)[0]
        assert alone.tokens == together[i].tokens
        assert alone.logprob == pytest.approx(together[i].logprob, abs=1e-4)


def test_beam_one_equals_greedy_on_random_states():
    torch.manual_seed(1)
    model = CaptionModel(ModelArgs(vocab_size=15)).eval()
    step = torch_step(model.decoder)
    h0 = torch.randn(64, 300).numpy() * 3
    g = greedy(step, h0, h0, 1, 2, 15)
    b = beam_search(step, h0, h0, 1, 2, 1, 15, 0.7)
    assert [x.tokens for x in g] == [x.tokens for x in b]
    assert [x.finished for x in g] == [x.finished for x in b]
    np.testing.assert_allclose([x.logprob for x in g], [x.logprob for x in b], atol=1e-4)
    assert len({x.tokens for x in g}) > 5, "the states must lead to different captions for this to mean anything"


def test_beam_one_equals_greedy_on_a_trained_model(memorised_run, shapes_data):
    from captioner.data import CocoCaptions, cache_images
    from captioner.preprocess import normalize

    ck = load(memorised_run)
    data = CocoCaptions(shapes_data / "captions_test.json")
    images = cache_images(data, ck.preprocess, progress=False)
    with torch.inference_mode():
        h0, c0 = (t.numpy() for t in ck.model.encoder(torch.from_numpy(normalize(images, ck.preprocess))))
    step = torch_step(ck.model.decoder)
    v = ck.vocab
    g = decode(step, h0, c0, v.start, v.end, DecodeParams(beam_size=1))
    b = beam_search(step, h0, c0, v.start, v.end, 1, 20, 0.7)
    assert texts(g, v) == texts(b, v)
    np.testing.assert_allclose([x.logprob for x in g], [x.logprob for x in b], atol=1e-4)


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    table = lambda p: {(): {A: 0.7, B: 0.3}}.get(p, {END: 1.0})  # noqa: E731
    lm = ToyLM(table)
    h0, c0 = lm.start(4000)
    one = sample(lm.step, h0, c0, START, END, 5, 1.0, seed=123)
    two = sample(ToyLM(table).step, h0, c0, START, END, 5, 1.0, seed=123)
    other = sample(ToyLM(table).step, h0, c0, START, END, 5, 1.0, seed=124)
    assert [h.tokens for h in one] == [h.tokens for h in two]
    assert [h.tokens for h in one] != [h.tokens for h in other]
    share_a = np.mean([h.tokens == (A,) for h in one])
    assert abs(share_a - 0.7) < 0.03
    assert all(h.finished and len(h.tokens) == 1 for h in one)
    # Temperature 2 flattens: p ~ sqrt(p) -> 0.837 / (0.837 + 0.548) = 0.604
    hot = sample(ToyLM(table).step, h0, c0, START, END, 5, 2.0, seed=5)
    assert abs(np.mean([h.tokens == (A,) for h in hot]) - 0.604) < 0.03
    # Near zero temperature is greedy.
    cold = decode(ToyLM(greedy_trap).step, *lm.start(50), START, END, DecodeParams(temperature=1e-3, seed=0))
    assert {h.tokens for h in cold} == {(A, C)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beam_size=0), "beam_size must be in 1..10"),
        (dict(beam_size=MAX_BEAM + 1), "beam_size"),
        (dict(max_length=0), "max_length must be in 1..50"),
        (dict(max_length=MAX_LENGTH + 1), "max_length"),
        (dict(temperature=0.0), "temperature must be in"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=0.5, beam_size=3), "cannot be combined"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeParams(**kwargs).validate()
    lm = ToyLM(greedy_trap)
    with pytest.raises(ValueError, match=message):
        decode(lm.step, *lm.start(), START, END, DecodeParams(**kwargs))
    assert lm.batch_sizes == [], "nothing runs with bad parameters"


def test_good_parameters_pass_and_decode_dispatches():
    assert DecodeParams(beam_size=MAX_BEAM, max_length=MAX_LENGTH, temperature=None).validate().beam_size == MAX_BEAM
    lm = ToyLM(greedy_trap)
    assert decode(lm.step, *lm.start(), START, END, DecodeParams())[0].tokens == (A, C)
    assert decode(lm.step, *lm.start(), START, END, DecodeParams(beam_size=3))[0].tokens == (B,)
    assert isinstance(decode(lm.step, *lm.start(), START, END, DecodeParams(temperature=1.0, seed=1))[0], Hypothesis)
