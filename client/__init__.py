"""Client for the captioner Triton server (gRPC): `caption(paths)` or the (Async)CaptionClient classes."""
from client.core import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    AsyncCaptionClient,
    Caption,
    CaptionClient,
    CaptionError,
    RetryPolicy,
    caption,
    encode_image,
    find_images,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "AsyncCaptionClient",
    "Caption",
    "CaptionClient",
    "CaptionError",
    "RetryPolicy",
    "caption",
    "encode_image",
    "find_images",
]
