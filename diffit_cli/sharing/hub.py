"""A Hub repository holding an exported model folder, through `huggingface_hub`: downloading one into the Hub's
cache (`--ckpt OWNER/NAME`) and pushing one (`diffit export --push-to-hub`). Offline, without a token, or against a
repository holding something else, each fails before any transfer with one line saying what to do."""

from __future__ import annotations

import re
from pathlib import Path

from diffit_cli.downloads import offline
from diffit_cli.errors import DiffitError
from diffit_cli.sharing.folder import FOLDER_FILES, MODEL_FILE

# OWNER/NAME as the Hub spells repository ids: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
# files a Hub repository starts with or that the Hub adds itself: a push may land beside them
HUB_FILES = {".gitattributes", "README.md"}


class HubError(DiffitError):
    """A Hub repository that cannot be read or written as asked."""


def is_repo_id(ref: str) -> bool:
    """Whether `ref` reads as a Hub repository id OWNER/NAME rather than a local path: two parts, no weight-file
    suffix (`runs/x.pt` is a missing file, not a repository). Callers check for a local path of that name first."""
    return bool(REPO_ID.fullmatch(ref)) and not ref.lower().endswith(WEIGHT_SUFFIXES)


def download_model(repo_id: str) -> Path:
    """The local folder of the Hub repository `repo_id` (an exported model), downloaded into the Hub's cache."""
    hint = (
        f"download it where there is a network (huggingface-cli download {repo_id} --local-dir DIR) and pass --ckpt DIR"
    )
    if offline():
        raise HubError(f"{repo_id!r} is not a local path and downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE); {hint}")
    from huggingface_hub import snapshot_download  # here: only Hub repositories need it (slow import)

    try:
        folder = Path(snapshot_download(repo_id=repo_id))
    except Exception as e:  # no network, no such repository, no access: one message with the fix
        raise HubError(
            f"could not download the Hub repository {repo_id!r} ({type(e).__name__}: {_first_line(e)}); check the name "
            f"and your access (huggingface-cli login for a private one), or {hint}"
        ) from None
    if not (folder / MODEL_FILE).is_file():
        raise HubError(
            f"the Hub repository {repo_id!r} holds no {MODEL_FILE}: it is not a model exported by diffit export "
            f"(for a single weight file use --ckpt {repo_id}:FILE)"
        )
    return folder


def check_push(repo_id: str) -> None:
    """What a push needs, checked before any work: a repository id, the Hub not switched off, a token, and a
    repository that is missing or holds only an export's files."""
    if not is_repo_id(repo_id):
        raise HubError(f"--push-to-hub {repo_id!r}: give a Hub repository id OWNER/NAME")
    if offline():
        raise HubError(
            f"cannot push to {repo_id!r}: the Hub is off (HF_HUB_OFFLINE/DIFFIT_OFFLINE is set); unset it, or "
            f"export without --push-to-hub and upload the folder later (huggingface-cli upload {repo_id} DIR)"
        )
    from huggingface_hub import get_token  # here: only pushing needs it (slow import)

    if not get_token():
        raise HubError(
            f"cannot push to {repo_id!r}: no Hugging Face token; run huggingface-cli login or set HF_TOKEN, then "
            "rerun the same command"
        )
    foreign = sorted(set(_repo_files(repo_id)) - set(FOLDER_FILES) - HUB_FILES)
    if foreign:
        raise HubError(
            f"the Hub repository {repo_id!r} holds files that are not an export's ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); push to another repository or remove them"
        )


def _repo_files(repo_id: str) -> list[str]:
    """The files of the Hub repository `repo_id` ([] when it does not exist yet)."""
    from huggingface_hub import HfApi  # here: only pushing needs it (slow import)
    from huggingface_hub.errors import RepositoryNotFoundError  # (slow import, as above)

    try:
        return HfApi().list_repo_files(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return []
    except Exception as e:  # no network, a bad token
        raise HubError(f"cannot reach the Hub repository {repo_id!r} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def push_folder(folder: Path | str, repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hub repository `repo_id` (created when missing) and return its URL.

    `check_push`'s checks come first (again: the repository may have changed during the export). The upload is one
    commit of the folder's files, so an interrupted push leaves the repository as it was; a rerun uploads what
    differs (the Hub stores a file once by its content)."""
    check_push(repo_id)
    from huggingface_hub import HfApi  # here: only pushing needs it (slow import)

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=list(FOLDER_FILES),
            commit_message="diffit export",
        )
    except Exception as e:  # no network, a name owned by someone else, an interrupted transfer
        raise HubError(
            f"pushing {str(folder)!r} to {repo_id!r} failed ({type(e).__name__}: {_first_line(e)}); the folder is "
            f"complete: upload it with huggingface-cli upload {repo_id} {folder}, or rerun with --force"
        ) from None
    return str(url) if url else f"https://huggingface.co/{repo_id}"
