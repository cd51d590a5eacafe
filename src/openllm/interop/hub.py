"""``openllm push``: hand a model on through the Hugging Face Hub, in one commit, with its card and tokenizer.

PATH is an export directory (uploaded as it is, after ``openllm verify``'s checks pass), or a run directory or
checkpoint, which is exported first into a temporary directory (``--gguf`` adds ``model.gguf`` beside the
Hugging Face files). ``--dry-run`` lists what would be uploaded, with sizes, and checks the repository name
and the files without any network. The upload itself is ``huggingface_hub``'s: the repository is created if
it does not exist (private with ``--private``, which refuses an existing public one), ``--revision`` names a
branch (created from main when missing), and every file goes in one commit. The token is ``HF_TOKEN`` or the
one ``hf auth login`` saved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openllm.core.errors import OpenLLMError
from openllm.core.extras import require
from openllm.core.options import Opt
from openllm.interop.export import GGUF_FILE, export_checkpoint
from openllm.interop.gpt2 import is_export_dir


@dataclass
class PushResult:
    repo: str
    revision: str
    files: dict[str, int]  # path in the repository -> bytes
    url: str | None = None  # the commit's address; None for a dry run


def push_model(
    path: str | os.PathLike,  # (a positional argument: the CLI declares it)
    repo: Annotated[str, Opt("the Hub repository, USER/NAME (or ORG/NAME)", metavar="USER/NAME")],
    *,
    private: Annotated[
        bool, Opt("create the repository private (an existing public one is refused, nothing uploaded)")
    ] = False,
    revision: Annotated[
        str | None, Opt("branch to commit to (created from main when missing)", metavar="BRANCH")
    ] = None,
    gguf: Annotated[bool, Opt("also upload model.gguf (f16), exported from the run directory or checkpoint")] = False,
    dry_run: Annotated[bool, Opt("list what would be uploaded and check the name, without network")] = False,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Upload ``path`` to the Hub repository ``repo`` in one commit (or, with ``dry_run``, say what would be)."""
    require("huggingface_hub", "hub", "openllm push")
    _check_repo_name(repo)
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise OpenLLMError(f"--revision must be a branch name, got {revision!r}")
    source = Path(path)
    if not source.exists():
        raise OpenLLMError(f"model not found: {source}")
    token = None if dry_run else _token()  # (before any export: a push that cannot upload does no work)
    staging = None
    try:
        gguf_export = source.is_dir() and (source / GGUF_FILE).is_file() and not (source / "best_model.pt").is_file()
        if is_export_dir(source) or gguf_export:
            if gguf:
                raise OpenLLMError(
                    "--gguf exports from a run directory or checkpoint; an export directory is uploaded as it is "
                    "(push the run directory with --gguf, or a directory that `openllm export --format gguf` wrote)"
                )
            _check_export(source)
            folder = source
        else:
            staging = Path(tempfile.mkdtemp(prefix="openllm-push-"))
            folder = staging / "model"
            export_checkpoint(source, folder)
            if gguf:
                export_checkpoint(source, staging / "gguf", format="gguf")
                shutil.move(staging / "gguf" / GGUF_FILE, folder / GGUF_FILE)
        files = {
            p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        }
        branch = revision or "main"
        where = f"{repo} ({branch}{', private if new' if private else ''})"
        if dry_run:
            for name, size in files.items():
                log(f"  {name:<28} {size:>15,} bytes")
            total = sum(files.values()) / 1e6
            log(f"dry run: would upload {len(files)} files ({total:.2f} MB) to {where} in one commit")
            return PushResult(repo, branch, files)
        url = _upload(folder, repo, private, revision, files, token)
        log(f"uploaded {len(files)} files ({sum(files.values()) / 1e6:.2f} MB) to {where}: {url}")
        return PushResult(repo, branch, files, url)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _check_repo_name(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo.count("/") != 1:
        raise OpenLLMError(f"--repo must be USER/NAME (or ORG/NAME), got {repo!r}")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise OpenLLMError(f"--repo {repo!r} is not a valid Hub repository name: {exc}") from None


def _check_export(folder: Path) -> None:
    from openllm.interop.inspect import verify_path

    checked = [folder] if is_export_dir(folder) else []
    checked += [folder / GGUF_FILE] if (folder / GGUF_FILE).is_file() else []
    for v in (v for path in checked for v in verify_path(path)):
        if not v.ok:
            raise OpenLLMError(f"{folder} does not verify, so it is not uploaded: {'; '.join(v.problems)}")


def _token() -> str:
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise OpenLLMError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def _upload(folder: Path, repo: str, private: bool, revision: str | None, files: dict[str, int], token) -> str:
    """One commit of ``folder`` to ``repo``; every Hub or network failure is one line."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    unreachable: tuple[type[BaseException], ...] = (*_transport_errors(), OSError)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if private and not api.repo_info(repo).private:  # an existing public repository: nothing is uploaded
            raise OpenLLMError(
                f"{repo} already exists and is public; --private applies to a new repository (make it private on "
                "the Hub first, or leave out --private)"
            )
        if revision is not None:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=revision,
            commit_message=f"Upload model with OpenLLM ({len(files)} files)",
            allow_patterns=list(files),
        )
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", 0)
        reasons = {401: "the token was refused", 403: "the token may not write there", 404: "not found"}
        why = reasons.get(status, "") if isinstance(status, int) else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpenLLMError(f"the Hub refused the upload to {repo}{': ' + why if why else ''} ({first})") from None
    except unreachable as exc:
        raise OpenLLMError(
            f"could not reach the Hub ({constants.ENDPOINT}) to upload {repo}: {type(exc).__name__}: {exc}"
        ) from None
    return str(getattr(info, "commit_url", info))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection and protocol errors (huggingface_hub 2 uses httpx2, earlier ones httpx)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)
