"""Benchmarks: the in-process bound, the Triton stack over gRPC and a naive HTTP peer,
measured side by side by `python -m bench.run` (`make bench`)."""
