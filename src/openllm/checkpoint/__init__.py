"""Checkpoints and run directories: the checkpoint format (one file), the run state it carries, the files
beside it, and the training curves. Imports only :mod:`openllm.core`, :mod:`openllm.data` and :mod:`openllm.model`."""
