"""Model cards with Hub metadata, and ``--push-to-hub`` for the checkpoints evotool writes.

:func:`card_with_metadata` puts YAML front matter (``huggingface_hub.ModelCardData``: ``base_model``,
``pipeline_tag``, ``library_name``, ``tags`` and an ``evotool`` block with the stage summary and what was
changed) above a card's Markdown. :func:`check_push` refuses a push before any work starts (offline hub,
no token, malformed repo id); :func:`push_folder` uploads a finished checkpoint. Both raise
:class:`~evotool.errors.HubError` (one line, exit 2); the local checkpoint is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evotool.errors import HubError

PIPELINE_TAG = "image-text-to-text"
IGNORE = ["wandb/*", "*.tmp", ".*"]  # run logs and half-written files stay local


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id (``org/name``) that is not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_with_metadata(body: str, base_model: str | None, tags: list[str], evotool: dict[str, Any]) -> str:
    """``body`` (Markdown) under Hub front matter; ``base_model`` is kept only when it is a Hub id."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model if is_hub_id(base_model) else None, pipeline_tag=PIPELINE_TAG,
                         library_name="transformers", tags=["evotool", *tags], evotool=evotool)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def check_push(repo_id: str | None) -> None:
    """Refuse a push that cannot work, before the checkpoint is computed (no network call)."""
    if repo_id is None:
        return
    from huggingface_hub import constants, get_token

    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise HubError(f"--push-to-hub expects a Hub repo id such as user/name, not {repo_id!r}")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)")
    if get_token() is None:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a checkpoint folder (not its W&B logs) to model repo ``repo_id`` (created if missing); its URL."""
    check_push(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=IGNORE,
                                 commit_message=f"evotool: upload {Path(folder).name}")
    except Exception as err:  # network, auth, quota: one line, the local checkpoint stays
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HubError(f"push of {folder} to {repo_id} failed ({reason}); the checkpoint is intact in {folder}") from err
    return str(info.commit_url)
