"""Telling, quickly and plainly, whether the configured weights can be had.

open_clip's own download retries for about a minute before failing on a
machine with no network; the demo asks here first so it can say so at once.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pipeline.config import ModelSettings

_HUB_HOST = "huggingface.co"


def weights_availability(settings: ModelSettings) -> tuple[bool, str]:
    """(available, reason). A local file or a cached hub file counts; so does a reachable hub."""
    pretrained = settings.pretrained
    if not pretrained:
        return False, "no pretrained weights are configured"
    if Path(pretrained).is_file():
        return True, f"local checkpoint {pretrained}"
    if _in_hub_cache(settings.name, pretrained):
        return True, "found in the Hugging Face cache"
    if _hub_reachable():
        return True, f"{_HUB_HOST} is reachable; weights will be downloaded"
    return False, f"not in the Hugging Face cache and {_HUB_HOST} cannot be reached (no network)"


def _in_hub_cache(name: str, tag: str) -> bool:
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag) if not tag.startswith("hf-hub:") else {"hf_hub": tag[7:]}
    hub_id = (cfg or {}).get("hf_hub", "")
    if not hub_id:
        return False
    repo = hub_id.rstrip("/").split("/")
    repo_id = "/".join(repo[:2])
    for filename in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return True
    return False


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False
