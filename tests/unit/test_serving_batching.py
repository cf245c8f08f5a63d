import numpy as np
import pytest

from captioner.serving.batching import concat, run_batched, split


def test_concat_then_split_gives_back_every_request():
    parts = [np.arange(6).reshape(3, 2), np.arange(2).reshape(1, 2) + 100, np.zeros((2, 2), int)]
    batch, sizes = concat(parts)
    assert batch.shape == (6, 2) and sizes == [3, 1, 2]
    for a, b in zip(split(batch, sizes), parts):
        np.testing.assert_array_equal(a, b)


def test_split_refuses_sizes_that_do_not_cover_the_batch():
    with pytest.raises(ValueError, match="6 rows"):
        split(np.zeros((6, 1)), [2, 2])


def test_run_batched_calls_the_model_once_for_all_requests():
    calls = []

    def model(x, y):
        calls.append(x.shape[0])
        return x + y, x * 2

    reqs = [(np.full((2, 3), i, float), np.ones((2, 3))) for i in range(4)]
    out = run_batched(model, reqs)
    assert calls == [8]
    for i, (s, d) in enumerate(out):
        np.testing.assert_array_equal(s, np.full((2, 3), i + 1.0))
        np.testing.assert_array_equal(d, np.full((2, 3), 2.0 * i))


def test_run_batched_refuses_inputs_of_one_request_with_different_batch_sizes():
    with pytest.raises(ValueError, match="disagree"):
        run_batched(lambda a, b: (a,), [(np.zeros((2, 1)), np.zeros((3, 1)))])
