"""OpenLLM: train GPT language models from scratch with complete, crash-safe checkpoints.

The library is organised one concept per module:

- :mod:`openllm.config`      model presets and the training configuration
- :mod:`openllm.model`       the GPT model
- :mod:`openllm.tokenizer`   SentencePiece tokenizer training and loading
- :mod:`openllm.data`        corpus cleaning, splitting, encoding and batching
- :mod:`openllm.checkpoint`  the checkpoint format, atomic writes and verification
- :mod:`openllm.train`       the training loop
- :mod:`openllm.cli`         the ``openllm`` command line
"""

__version__ = "0.2.0"

from openllm.errors import OpenLLMError  # noqa: E402

__all__ = ["OpenLLMError", "__version__"]
