"""Progress bars from tqdm when it is installed; a bare GPU image may lack it, and
training must still run there (`scripts/gpu_smoke.sh`)."""

from __future__ import annotations


class _Quiet:
    """The part of tqdm's interface this package uses, doing nothing."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def bar(iterable=None, **kwargs):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Quiet(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
