"""Inference: loading a model for use, generation, evaluation and the OpenAI-compatible server.
Imports core, data, model, checkpoint and interop; never training."""
