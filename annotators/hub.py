"""Loading VLM weights from the Hugging Face hub without a minute of retries when there is no network.

Without a network, huggingface_hub retries every candidate file five times with back-off (about a minute,
dozens of warning lines) before open_clip or transformers give up. `hub_load` probes the hub once (one TCP
connection, a few seconds at most); when it cannot be reached, the load runs in huggingface_hub's offline
mode, so weights already in the local cache still load and missing ones fail at once. The libraries' retry
and download logging is muted during the load: the caller reports the failure in one line (`one_line`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _unreachable() -> str | None:
    """Why the hub cannot be used now ('offline mode is set', 'huggingface.co cannot be reached (...)'), or
    None when it can (or when a proxy is configured: a direct probe would then say nothing)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{host} cannot be reached ({e})"
    return None


@contextlib.contextmanager
def hub_load() -> Iterator[str | None]:
    """Run a hub-backed load: yields why the hub is unusable (None if it is usable). Unusable: the load runs
    cache-only (huggingface_hub's offline mode, restored afterwards). The libraries' logging is muted."""
    from huggingface_hub import constants

    reason = _unreachable()
    was_offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was_offline or reason is not None  # read at call time by hub and transformers
    logging.disable(logging.CRITICAL)  # retry lines, open_clip's "ERROR:root: Failed to download ..."
    try:
        yield reason
    finally:
        logging.disable(logging.NOTSET)
        constants.HF_HUB_OFFLINE = was_offline


def one_line(e: BaseException) -> str:
    """The whole cause on one line (library messages span lines; cutting them at N characters cut words)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
