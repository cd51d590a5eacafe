from openllm.cli import entry

entry()
