"""captioner: Show-and-Tell image captioning, trained here and served from Triton."""

__version__ = "0.1.0"
