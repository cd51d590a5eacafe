#!/usr/bin/env python3
"""Legacy entry point: ``python core/src/convert_10k_model.py --input-dir DIR --output-dir DIR [--training-steps N]``.

A thin shell over ``openllm convert``: it detects the input kind (legacy export, Hugging Face
GPT-2, nanoGPT, openllm export) and writes a full, resumable run directory.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("openllm") is None:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from openllm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
