"""Locust load test of the captioner Triton server: `make loadtest` (loadtest.run) or
`locust -f loadtest/locustfile.py --host localhost:8001`."""
