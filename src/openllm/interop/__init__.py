"""Interoperability: other formats in and out (Hugging Face GPT-2, legacy OpenLLM, nanoGPT), inspection.
Imports core, data, model and checkpoint; never training or inference."""
