"""Optional packages: one message, everywhere, for a feature whose extra is not installed.

The distribution is called ``openllm-toolkit``: ``openllm`` on the package index is another project (a
self-hosting server), so ``pip install 'openllm[serve]'`` would install the wrong thing. The import package
and the command stay ``openllm``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from openllm.core.errors import OpenLLMError

DISTRIBUTION = "openllm-toolkit"


def missing_extra(feature: str, extra: str, module: str) -> OpenLLMError:
    return OpenLLMError(
        f"{feature} needs the {module} package, which is not installed: in a checkout run "
        f"`bash scripts/setup.sh {extra}` (or `pip install -c constraints.txt -e '.[{extra}]'`); "
        f"elsewhere `pip install '{DISTRIBUTION}[{extra}]'`"
    )


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or the one-line error naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(feature, extra, exc.name or module) from None
