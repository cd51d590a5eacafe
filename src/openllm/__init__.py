"""OpenLLM: train language models (GPT-2, Llama and Qwen2 blocks) from scratch with complete, crash-safe
checkpoints.

The package is layered; each folder is one layer and imports only from the layers listed before it:

==================  ==========================================================================
``core/``           errors, crash-safe files, fault injection, option declarations, device/dtype
``data/``           tokenizer, documents from raw text, ``openllm prepare``, dataset dirs, batches
``model/``          model config and presets, the architecture registry and one file per
                    architecture (gpt2, llama, qwen2), scoring text
``checkpoint/``     the checkpoint format (``checkpoint/format.py``, the only module that knows its
                    keys), the run state it carries, run-directory files, training curves
``interop/``        each architecture's family (Hugging Face adapter, GGUF layout), GGUF,
                    tokenizer.json, convert, export, inspect/verify
``training/``       train options, run set-up, the loop, schedule, optimizer, metrics, torchrun
``inference/``      loading a model for use, generation, ``openllm eval``, the HTTP server
``cli.py``          the ``openllm`` command line, on top of everything
==================  ==========================================================================

The rule: ``core`` < ``data`` < ``model`` < ``checkpoint`` < ``interop`` < {``training``,
``inference``} < ``cli``. ``interop`` and ``inference`` never import ``training``, ``training``
never imports ``interop`` or ``inference``, and no module imports a module that imports it back.
``tests/test_architecture.py`` checks this on every test run. ``docs/architecture.md`` says where
each concept lives and how to add an architecture.
"""

__version__ = "0.2.0"

from openllm.core.errors import OpenLLMError  # noqa: E402

__all__ = ["OpenLLMError", "__version__"]
