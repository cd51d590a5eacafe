"""Data: tokenizers, documents from raw text, prepared datasets and batches. Imports only :mod:`openllm.core`."""
