"""Models: the configuration and preset registry, the architectures, and scoring text with a model.
Imports only :mod:`openllm.core` and :mod:`openllm.data`."""
