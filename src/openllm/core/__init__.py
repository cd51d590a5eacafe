"""Foundation: errors, crash-safe files, fault injection, options, device resolution.

Imports nothing else of openllm."""
