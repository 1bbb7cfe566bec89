"""Reaching the Hugging Face hub: asked once per process, before anything is downloaded.

The libraries retry an unreachable hub with back-off for every file they look up, so an offline
`tav eval` used to spend ~50 s before its error. Instead one quick request tells whether the hub
answers; if it does not, every load looks in the local cache only (`local_files_only`) and a model
that is not there fails at once, with one line. `HF_HUB_OFFLINE=1`, `HF_ENDPOINT` and proxies are
respected, as huggingface_hub respects them.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tavcli.errors import TavError
from tavcli.models.names import HUB_ID

__all__ = ["PROBE_SECONDS", "hub_reachable", "local_folder", "local_only", "unreachable"]

PROBE_SECONDS = 5.0  # a reachable hub answers a HEAD request far sooner


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub answers now (any HTTP response counts); False when offline mode is set."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy, TLS: whatever fails, nothing can be downloaded
        return False
    return True


def local_only() -> bool:
    """Whether loads must use the local cache only (the hub cannot be reached)."""
    return not hub_reachable()


def unreachable(name: str, hint: str) -> TavError:
    """The one line for a model that is neither cached nor downloadable."""
    return TavError(f"cannot load {name!r}: the hub is unreachable and it is not in the local cache", hint)


def local_folder(name: str, what: str, flag: str) -> Path | None:
    """`name` as a local folder, or None for a hub id (`org/name`). A path that is neither (`./missing`, a file)
    is one line naming it: blaming the hub for a mistyped folder would send users the wrong way."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.match(name) and not path.exists():
        return None
    problem = "not a folder" if path.exists() else "no such folder"
    raise TavError(f"cannot load the {what} {name!r}: {problem}", f"give a {what} folder or a hub id with {flag}")
