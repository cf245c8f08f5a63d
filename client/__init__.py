"""Client for the captioner Triton server (gRPC): `caption(paths)` or the (Async)CaptionClient classes;
several endpoints with failover, TLS, and a deep health check (`client.health.check`)."""

from client.core import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    AsyncCaptionClient,
    Caption,
    CaptionClient,
    CaptionError,
    RetryPolicy,
    TLSConfig,
    caption,
    encode_image,
    find_images,
)
from client.endpoints import parse_endpoints

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "AsyncCaptionClient",
    "Caption",
    "CaptionClient",
    "CaptionError",
    "RetryPolicy",
    "TLSConfig",
    "caption",
    "encode_image",
    "find_images",
    "parse_endpoints",
]
