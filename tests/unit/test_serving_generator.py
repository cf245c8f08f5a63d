"""caption_generator's logic: merged batches decode exactly like the reference, per request."""

import fake_pb_utils
import numpy as np
import pytest
from serving_support import tiny_checkpoint

from captioner import checkpoint
from captioner.decoding import DecodeParams, decode, torch_step
from captioner.serving.generator import GenRequest, bls_step, generate


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return checkpoint.load(tiny_checkpoint(tmp_path_factory.mktemp("ck")))


def _states(n, u, seed):
    h = np.random.default_rng(seed).normal(0, 1, (n, u)).astype(np.float32)
    return h, h.copy()


def _alone(ck, req):
    hyps = decode(torch_step(ck.model.decoder), req.h0, req.c0, ck.vocab.start, ck.vocab.end, req.params)
    return [ck.vocab.decode(h.tokens) for h in hyps], np.asarray([h.logprob for h in hyps], np.float32)


def test_requests_with_mixed_parameters_get_what_each_would_get_alone(ck):
    u = ck.args.lstm_units
    greedy, beam3 = DecodeParams(max_length=12), DecodeParams(beam_size=3, max_length=12)
    short = DecodeParams(max_length=2)
    reqs = [
        GenRequest(*_states(n, u, i), p)
        for i, (n, p) in enumerate([(2, greedy), (1, beam3), (3, greedy), (2, short), (1, beam3)])
    ]
    calls = []
    step = torch_step(ck.model.decoder)

    def counting_step(tokens, h, c):
        calls.append(len(tokens))
        return step(tokens, h, c)

    out = generate(counting_step, ck.vocab, reqs)
    for req, got in zip(reqs, out):
        texts, scores = _alone(ck, req)
        assert got.texts == texts
        np.testing.assert_allclose(got.scores, scores, rtol=1e-5, atol=1e-5)
        assert got.scores.dtype == np.float32
    # Three parameter groups, each decoded in batched steps: the first step of the
    # greedy group carries all 5 of its rows at once.
    assert 5 in calls


def test_token_count_is_the_number_of_caption_tokens(ck):
    u = ck.args.lstm_units
    (out,) = generate(torch_step(ck.model.decoder), ck.vocab, [GenRequest(*_states(4, u, 9), DecodeParams(max_length=12))])
    hyps = decode(torch_step(ck.model.decoder), *_states(4, u, 9), ck.vocab.start, ck.vocab.end, DecodeParams(max_length=12))
    assert out.tokens == sum(len(h.tokens) for h in hyps)


def test_bls_step_sends_the_decoder_step_tensors_and_returns_its_outputs(ck):
    pb = fake_pb_utils.make_module()
    step = torch_step(ck.model.decoder)
    seen = []

    def handler(request):
        seen.append(request)
        x = {t.name(): t.as_numpy() for t in request.inputs()}
        logp, h, c = step(x["tokens"].reshape(-1), x["h"], x["c"])
        return pb.InferenceResponse(output_tensors=[pb.Tensor("log_probs", logp), pb.Tensor("h_out", h), pb.Tensor("c_out", c)])

    pb.InferenceRequest.handler = handler
    h, c = _states(3, ck.args.lstm_units, 1)
    tokens = np.full(3, ck.vocab.start, np.int64)
    got = bls_step(pb, "decoder_step")(tokens, h, c)
    want = step(tokens, h, c)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    req = seen[0]
    assert req.model_name() == "decoder_step"
    assert req.requested_output_names() == ["log_probs", "h_out", "c_out"]
    assert {t.name(): t.as_numpy().shape for t in req.inputs()} == {"tokens": (3, 1), "h": h.shape, "c": c.shape}
    assert req.preferred_memory.preferred_memory_type == pb.TRITONSERVER_MEMORY_CPU


def test_bls_step_raises_the_decoder_step_error(ck):
    pb = fake_pb_utils.make_module()
    pb.InferenceRequest.handler = lambda r: pb.InferenceResponse(error=pb.TritonError("out of memory"))
    h, c = _states(1, ck.args.lstm_units, 2)
    with pytest.raises(RuntimeError, match="decoder_step failed: out of memory"):
        bls_step(pb)(np.zeros(1, np.int64), h, c)
