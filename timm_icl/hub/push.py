"""Upload an exported folder to the Hugging Face Hub (:func:`push_to_hub`), and check beforehand that a push can
succeed (:func:`validate_push`, before a long training run). Failures the user can fix raise :class:`HubError` with
one line saying what was wrong and what to do; the local folder is never changed by a failed push.

Example:
    >>> validate_push("me/vgg16-icl")  # doctest: +SKIP
    >>> push_to_hub("runs/icl/model", "me/vgg16-icl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..utils.errors import first_line
from ..utils.files import atomic_write_text
from .card import render_model_card
from .export import non_finite_summary, non_finite_tensors, resolve_model_folder

__all__ = ["HubError", "push_to_hub", "validate_push"]

_logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A push to the Hub failed for a reason the user can fix (offline, not authorised, bad repo id)."""


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    retries: int = 3,
    is_main_process: bool = True,
) -> str | None:
    """Upload an exported folder to the Hub (main process only), with its card re-rendered for ``repo_id``.

    Every push uploads the card again, so it always matches the weights and numbers (timm's own push writes a
    README only once). The card is uploaded from memory and written to the local folder only after the push
    succeeded: a failed push leaves the folder byte for byte as it was. Weights with NaN/inf are refused. The
    token is passed to huggingface_hub only (default: ``HF_TOKEN`` or the saved login); it is never written to a
    file or a log message.

    Args:
        folder: an exported folder (or a recipe run folder containing ``model/``).
        repo_id: ``"user/name"``.
        token: a write token; ``None`` uses huggingface_hub's own lookup.
        private: create the repository as private (if it does not exist yet).
        commit_message: default ``"Upload <model_name> (timm-icl)"``.
        retries: attempts on transient failures (connection errors, HTTP 429/5xx), with 1, 2, 4 ... s back-off.
        is_main_process: whether this process uploads; in a multi-process job pass e.g.
            ``accelerator.is_main_process`` (the caller knows; the library does not guess from the environment).

    Returns:
        The commit URL, or ``None`` when ``is_main_process`` is False.

    Raises:
        HubError: offline mode, not authorised, or the Hub kept failing; the local folder is left intact.
        ValueError: ``folder`` is not an exported model, its weights are damaged or not finite, or ``repo_id`` is
            malformed.
    """
    folder = resolve_model_folder(folder)
    _check_repo_id(repo_id)
    if not is_main_process:
        return None
    _check_finite_folder(folder, repo_id)
    if _offline():
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push. "
            f"The exported folder {folder} is unchanged."
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    # HTTPError: the transport errors' base class (httpx's), re-exported by huggingface_hub for this purpose
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError

    # The card for this repository (load snippet with hf-hub:<repo_id>) is uploaded from memory; the local README
    # is updated only after the push succeeded, so a failed push leaves the folder exactly as it was.
    card = render_model_card(folder, repo_id)

    config = json.loads((folder / "config.json").read_text())
    message = commit_message or f"Upload {config.get('icl', {}).get('model_name') or folder.name} (timm-icl)"
    api = HfApi(token=token)
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts) and p.name != "README.md"
    ]
    delay = 1.0
    for attempt in range(1, max(1, retries) + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [
                CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
            ]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
            info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
            atomic_write_text(folder / "README.md", card)
            return str(info.commit_url)
        except RepositoryNotFoundError as e:
            raise HubError(_auth_message(repo_id, e)) from None
        except HfHubHTTPError as e:
            status = _status_unless_unauthorised(repo_id, e)
            if status is not None and status < 500 and status != 429:
                raise HubError(f"the Hub refused the push to {repo_id} (HTTP {status}): {first_line(e)}") from None
            last = f"HTTP {status}: {first_line(e)}"
        except (OSError, HTTPError) as e:  # refused / reset connections, DNS, timeouts: worth another try
            last = f"{type(e).__name__}: {first_line(e)}"
        if attempt < retries:
            _logger.warning("push to %s failed (%s); retrying in %.0f s", repo_id, last, delay)
            time.sleep(delay)
            delay *= 2
    raise HubError(
        f"push to {repo_id} failed after {retries} attempts ({last}); the exported folder {folder} is intact"
    )


def validate_push(repo_id: str, *, token: str | None = None) -> str:
    """Check, before a long training run, that a push to ``repo_id`` can succeed; one-line errors.

    Checks the repo id's syntax (huggingface_hub's validator, plus a namespace), offline mode, and the token: it
    must exist, be valid (``whoami``), not be read-only, and belong to the namespace (the user or one of their
    organisations where their role is not read; a fine-grained token must name it with a write permission). Whether
    an existing repository accepts this user's writes is known only at the push itself.

    Args:
        repo_id: ``"user/name"``.
        token: a write token; ``None`` uses huggingface_hub's own lookup (``HF_TOKEN`` or the saved login).

    Returns:
        The user name the token belongs to.

    Raises:
        ValueError: a malformed repo id.
        HubError: offline mode, no token, an invalid or read-only token, a namespace the token cannot write to, or
            the Hub cannot be reached.
    """
    _check_repo_id(repo_id)
    if _offline():
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError

    try:
        info = HfApi(token=token).whoami(cache=True)
    except LocalTokenNotFoundError:
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except HfHubHTTPError as e:
        status = _status_unless_unauthorised(repo_id, e)
        raise HubError(f"cannot push to {repo_id}: the Hub answered HTTP {status} ({first_line(e)})") from None
    except (OSError, HTTPError) as e:  # connection errors
        raise HubError(
            f"cannot push to {repo_id}: the Hub at {constants.ENDPOINT} cannot be reached ({first_line(e)})"
        ) from None
    user = info.get("name")
    namespace = repo_id.split("/")[0]
    orgs = {org.get("name"): org for org in info.get("orgs") or []}
    access = (info.get("auth") or {}).get("accessToken") or {}
    fix = "create a token with write access at https://huggingface.co/settings/tokens and set HF_TOKEN"
    if access.get("role") == "read":
        raise HubError(f"cannot push to {repo_id}: the token of {user!r} is read-only; {fix}")
    if namespace != user and namespace not in orgs:
        raise HubError(
            f"cannot push to {repo_id}: the token belongs to {user!r}, who is not {namespace!r} nor a member of it"
        )
    if namespace in orgs and orgs[namespace].get("roleInOrg") == "read":
        raise HubError(f"cannot push to {repo_id}: {user!r} has only the read role in {namespace!r}")
    if access.get("role") == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        writable = [
            entry
            for entry in scoped
            if (entry.get("entity") or {}).get("name") in (namespace, repo_id)
            and any("write" in permission for permission in entry.get("permissions") or [])
        ]
        if not writable:
            raise HubError(f"cannot push to {repo_id}: the fine-grained token cannot write to {namespace!r}; {fix}")
    return user


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"invalid repo_id {repo_id!r}: {first_line(e)}") from None


def _check_finite_folder(folder: Path, repo_id: str) -> None:
    """Refuse to push weights that do not load or hold NaN/inf (read one tensor at a time)."""
    from safetensors import SafetensorError, safe_open

    path = folder / "model.safetensors"
    bad, dtypes = [], {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(name)
                dtypes[name] = tensor.new_empty(0)  # dtype only: for the count of floating tensors
                bad += non_finite_tensors({name: tensor})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot push {path}: it is damaged or truncated ({first_line(e)})") from None
    if bad:
        raise ValueError(f"refusing to push {folder} to {repo_id}: {non_finite_summary(bad, dtypes)}")


def _auth_message(repo_id: str, e: BaseException) -> str:
    return (
        f"not authorised to push to {repo_id}: log in with `hf auth login` or set HF_TOKEN to a token with write "
        f"access to that namespace ({first_line(e)})"
    )


def _status_unless_unauthorised(repo_id: str, e: BaseException) -> int | None:
    """The HTTP status of a Hub error (None without a response); 401/403 raise the not-authorised HubError."""
    status = e.response.status_code if e.response is not None else None
    if status in (401, 403):
        raise HubError(_auth_message(repo_id, e)) from None
    return status
