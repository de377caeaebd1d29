"""Loading and saving state dicts safely.

Loading never unpickles arbitrary objects: torch files go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Saving writes safetensors atomically: a temporary file in the target folder, then
``os.replace``, so an interrupted save never leaves a partial file behind.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from merging.state import SourcedStateDict, StateDictError, check_state_dict

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


class CheckpointError(StateDictError):
    """A file could not be read as a state dict."""


def load_state_dict(path: str | os.PathLike, *, prefix: str | None = None, check: bool = True) -> SourcedStateDict:
    """Load a state dict from safetensors, a torch file or a Lightning checkpoint.

    Args:
        path: ``*.safetensors``; a torch file (``*.pt``, ``*.pth``, ``*.bin``) holding a
            state dict, or a dict with a ``"state_dict"`` entry; a Lightning ``*.ckpt``.
        prefix: keep only keys starting with this prefix and strip it (e.g. ``"model."``
            for a LightningModule whose network is ``self.model``).
        check: verify every value is a tensor with finite floating values.

    Returns:
        The state dict (a ``dict`` remembering its ``source`` path for error messages).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated, not a state dict, or would need arbitrary
            unpickling; or no key has ``prefix``. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        try:
            raw: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not looks_like_torch_file(path):
                raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)") from err
            raise CheckpointError(
                f"{path}: refused to load: the file holds objects other than tensors and plain "
                f"containers, and arbitrary unpickling is never done ({str(err).splitlines()[0]})"
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable torch file, possibly truncated ({err})") from err
        if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
            raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a state dict (a mapping of names to tensors)")
    state = dict(raw)
    if prefix:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not stripped:
            sample = ", ".join(repr(k) for k in list(state)[:5])
            raise CheckpointError(f"{path}: no key starts with prefix {prefix!r} (keys look like {sample})")
        state = stripped
    if check:
        check_state_dict(state, owner=str(path))
    return SourcedStateDict(state, source=str(path))


def looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, legacy, a pickle starting with the PROTO opcode)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def save_state_dict(
    state: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save a state dict as safetensors, atomically.

    The tensors are checked first (strings to finite tensors); then the file is written to
    a temporary name in the target folder and renamed into place, so the target is either
    the complete new file or untouched.

    Args:
        state: the state dict.
        path: target ``*.safetensors`` path (parent folders are created).
        metadata: optional string metadata stored in the file header.

    Returns:
        The written path.

    Raises:
        StateDictError: a value is not a tensor or is not finite (nothing is written).
        ValueError: the suffix is not ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: merged weights are saved as safetensors; use a '.safetensors' suffix")
    check_state_dict(state, owner=f"state dict to save to {path}")
    # safetensors refuses shared or non-contiguous storage: give every tensor its own.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata) if metadata else None))
    return path


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path``.

    The temporary file lives in ``path``'s folder (so the rename is atomic) and is removed
    if ``write`` fails. The file gets the permissions a plain ``open`` would give it (0666
    less the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (tables, reports)."""
    path = Path(path)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path
