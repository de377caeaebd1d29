r"""Streamed merges from safetensors files: K experts never held in memory at once.

    merging merge --experts a.safetensors b.safetensors --base base.safetensors \
        --method ties --hparams density=0.2 scaling=1.0 --out merged.safetensors

Three pieces:

- :class:`LazySafetensors`, a read-only ``Mapping[str, Tensor]`` over one file. Keys,
  shapes and dtypes come from the header; a tensor is read from disk only when indexed and
  is not cached. Reads are positional (``readinto`` a fresh buffer), not a memory map: the
  pages of a mapping stay resident, and counted in the process's memory, for as long as
  the file is open, so reading K memory-mapped files through would grow the resident set
  to their total size.
- :func:`stream_safetensors`, a writer that emits the header first (the layout is known
  before any data), then each tensor's bytes as it is produced, into a temporary file that
  is renamed onto the target only when complete (:func:`merging.io.write_atomic`).
- :func:`merge_files`, which runs :meth:`MergeMethod.merge`'s semantics entry by entry over
  lazy files: peak memory is about K + 2 tensors of the largest entry for per-tensor
  methods, plus whatever :meth:`MergeMethod.prepare` keeps (global TIES: a sample and the
  bracketed candidates of its exact threshold search, see
  :func:`merging.methods.topk.global_magnitude_thresholds`).

The result equals ``method.merge(experts, base)`` on the same state dicts loaded in memory,
bit for bit: the per-entry arithmetic is the method's own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from merging.io import CheckpointError, looks_like_torch_file, write_atomic
from merging.methods import MergeMethod, available_methods, get_method
from merging.state import (
    SourcedStateDict,
    StateDictError,
    check_compatible,
    check_finite,
    describe,
)

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype codes and the torch dtypes they hold (little-endian bytes)."""

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LENGTH = struct.Struct("<Q")
_METADATA_KEY = "__metadata__"
_OWN_MAPPING_BYTES = 1 << 20
# Pre-faulted in one call (MAP_POPULATE, Linux): about twice as fast as faulting page by page.
_ANONYMOUS_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


class _Entry(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int  # absolute byte offsets in the file
    end: int


class LazySafetensors(Mapping[str, Tensor]):
    """A read-only state dict over a safetensors file, read one tensor at a time.

    ``len``, iteration, :meth:`shape`, :meth:`dtype` and :meth:`header` use the header only.
    ``state[key]`` reads that tensor's bytes into a fresh CPU tensor (owned by the caller,
    never cached), so iterating ``items()`` holds one tensor at a time.

    Keys iterate in the order of the tensors' bytes in the file, so a pass over the keys
    reads the file sequentially.

    Args:
        path: a ``*.safetensors`` file.

    Attributes:
        source: the path, as a string (named in :mod:`merging.state`'s error messages).
        metadata: the header's ``__metadata__`` strings (empty if none).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a readable safetensors file, or holds a dtype this
            class does not read (the message names the file, and the key).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such safetensors file: {self.path}")
        if looks_like_torch_file(self.path):
            raise CheckpointError(
                f"{self.path}: a torch checkpoint (torch.save or a Lightning .ckpt), not a safetensors file; "
                "merges from files read only safetensors, whose header gives every tensor's place without "
                f"unpickling. Convert it once: merging convert {self.path} {self.path.with_suffix('.safetensors')} "
                "(add --prefix model. to keep and strip a LightningModule's attribute prefix)"
            )
        try:
            # safetensors validates the header (offsets in bounds, contiguous, no overlap).
            with safe_open(self.source, framework="pt") as handle:
                self.metadata: dict[str, str] = dict(handle.metadata() or {})
            with open(self.path, "rb") as f:
                (length,) = _HEADER_LENGTH.unpack(f.read(_HEADER_LENGTH.size))
                header = json.loads(f.read(length))
        except (SafetensorError, OSError, ValueError, struct.error) as err:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from err
        data_start = _HEADER_LENGTH.size + length
        entries = []
        for key, info in header.items():
            if key == _METADATA_KEY:
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{self.path}: key {key!r} has safetensors dtype {info['dtype']}, which is not read here "
                    f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
                )
            begin, end = info["data_offsets"]
            entries.append(
                (
                    begin,
                    key,
                    _Entry(
                        tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], data_start + begin, data_start + end
                    ),
                )
            )
        self._entries: dict[str, _Entry] = {key: entry for _, key, entry in sorted(entries)}

    def __getitem__(self, key: str) -> Tensor:
        entry = self._entries[key]
        size = entry.end - entry.begin
        if size >= _OWN_MAPPING_BYTES:
            # An anonymous mapping per large tensor, unmapped as soon as the tensor is freed.
            # From the heap, glibc's dynamic mmap threshold soon places such buffers where
            # small long-lived allocations (e.g. a global-threshold sample) fragment it, and
            # the process keeps hundreds of MB it no longer uses.
            buffer = torch.frombuffer(mmap.mmap(-1, size, flags=_ANONYMOUS_FLAGS), dtype=torch.uint8)
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        filled = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(entry.begin)
            # One read returns at most ~2 GiB on Linux: loop until the entry is complete.
            while filled < len(view):
                count = f.readinto(view[filled:])
                if not count:
                    raise CheckpointError(
                        f"{self.path}: key {key!r} is truncated (read {filled} of {len(view)} bytes); "
                        "the file changed or was cut after it was opened"
                    )
                filled += count
        return buffer.view(entry.dtype).reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> torch.Size:
        """The shape of ``key``, from the header."""
        return torch.Size(self._entries[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of ``key``, from the header."""
        return self._entries[key].dtype

    def header(self) -> SourcedStateDict:
        """The file's layout as ``meta`` tensors (shapes and dtypes, no data), in file order.

        Structural checks (:func:`merging.state.check_compatible` with ``check_values=False``)
        run on it without reading a byte of tensor data.
        """
        layout = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self._entries.items()}
        return SourcedStateDict(layout, source=self.source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} tensors)"


def stream_safetensors(
    path: str | os.PathLike,
    layout: Mapping[str, Tensor],
    entries: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, as the tensors are produced, atomically.

    The header is computed from ``layout`` and written first; each ``(key, tensor)`` from
    ``entries`` is then checked against it (order, shape, dtype, finite values) and its
    bytes appended. Everything goes to a temporary file in the target folder that replaces
    ``path`` only once every entry is written: if ``entries`` raises, or a check fails,
    the temporary file is removed and ``path`` is left as it was.

    Args:
        path: target ``*.safetensors`` file (parent folders are created).
        layout: key -> a tensor of the entry's shape and dtype (``meta`` tensors do), in
            the order the entries will come.
        entries: ``(key, tensor)`` pairs in ``layout``'s order; CPU or any device.
        metadata: optional string metadata for the header.

    Returns:
        The written path.

    Raises:
        ValueError: the suffix is not ``.safetensors``, a dtype has no safetensors code, or
            metadata is not strings.
        StateDictError: an entry comes out of order, with another shape or dtype, or with
            NaN/inf values; or ``entries`` ends early or has extra entries.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: merged weights are saved as safetensors; use a '.safetensors' suffix")
    header_bytes = _encode_header(layout, metadata, owner=str(path))
    owner = f"merged state dict for {path}"

    def write(tmp: str) -> None:
        expected = iter(layout.items())
        with open(tmp, "wb") as f:
            f.write(_HEADER_LENGTH.pack(len(header_bytes)))
            f.write(header_bytes)
            for key, tensor in entries:
                want_key, want = next(expected, (None, None))
                if key != want_key:
                    raise StateDictError(
                        f"{owner}: got key {key!r} where the header has "
                        + (f"{want_key!r}" if want_key is not None else "no more keys")
                    )
                if tensor.shape != want.shape or tensor.dtype != want.dtype:
                    raise StateDictError(
                        f"{owner}: key {key!r} is {tuple(tensor.shape)} {tensor.dtype}, but the header says "
                        f"{tuple(want.shape)} {want.dtype}"
                    )
                check_finite(tensor, key, owner)
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del tensor, data  # not alive while the next entry is produced
            missing = [k for k, _ in expected]
            if missing:
                raise StateDictError(f"{owner}: entries ended before {len(missing)} key(s), first {missing[0]!r}")

    write_atomic(path, write)
    return path


def _encode_header(layout: Mapping[str, Tensor], metadata: Mapping[str, str] | None, owner: str) -> bytes:
    """The JSON header, space-padded to a multiple of 8 bytes (tensor data stays aligned)."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{owner}: safetensors metadata must map strings to strings, got {dict(metadata)!r}")
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for key, spec in layout.items():
        if key == _METADATA_KEY:
            raise ValueError(f"{owner}: {_METADATA_KEY!r} is reserved by safetensors and cannot name a tensor")
        if spec.dtype not in _DTYPE_CODES:
            raise ValueError(
                f"{owner}: key {key!r} has dtype {spec.dtype}, which has no safetensors code here "
                f"(supported: {', '.join(str(d) for d in _DTYPE_CODES)})"
            )
        size = spec.numel() * spec.element_size()
        header[key] = {
            "dtype": _DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def merge_files(
    method: MergeMethod,
    expert_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    base_path: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    data: Iterable[Any] | None = None,
    check_values: bool = True,
    metadata: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Merge K expert safetensors files into one, streamed entry by entry.

    The steps of :meth:`MergeMethod.merge`, over :class:`LazySafetensors`:

    1. ``method.check_inputs`` (what the method needs);
    2. keys, shapes and dtypes of every file against the others, from the headers alone
       (:func:`merging.state.check_compatible` on :meth:`LazySafetensors.header`), then,
       with ``check_values``, one pass over each file for NaN/inf, one tensor at a time;
    3. ``method.prepare`` on the lazy files (global TIES streams its threshold search);
    4. per entry, in expert 0's order: the K experts' values (and θ₀'s) are read, merged
       by the method's own per-entry code and written out by :func:`stream_safetensors`.
       Non-float entries are copied from the base, or from expert 0 without one.

    Args:
        method: a merge method whose merge is per entry (every method that does not
            override :meth:`MergeMethod.merge`).
        expert_paths: θ_1..θ_K, ``*.safetensors`` files with identical layouts.
        out_path: target ``*.safetensors`` file, written atomically.
        base_path: θ₀, the pretrained weights (required by task-vector methods).
        model: passed to ``check_inputs``/``prepare`` (data-dependent methods).
        data: passed to ``check_inputs``/``prepare`` (data-dependent methods).
        check_values: scan every input for NaN/inf before merging (one extra read pass).
        metadata: string metadata for the output header.
        progress: show a rich progress bar over tensors (on stderr).

    Returns:
        The written path.

    Raises:
        FileNotFoundError: an input file is missing (the message names it).
        CheckpointError: an input is not a readable safetensors file.
        StateDictError: the files disagree in keys, shapes or dtypes, or hold NaN/inf
            (the message names the key and the file).
        ValueError: the method overrides ``merge`` (it needs whole state dicts), or
            misses an input it requires.
    """
    if type(method).merge is not MergeMethod.merge:
        raise ValueError(
            f"{method.name} overrides merge() and works on whole state dicts, so it cannot be streamed; "
            "load the experts with merging.io.load_state_dict and call method.merge"
        )
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"{out_path}: merged weights are saved as safetensors; use a '.safetensors' suffix")
    experts = [LazySafetensors(p) for p in expert_paths]
    base = LazySafetensors(base_path) if base_path is not None else None
    method.check_inputs(experts, base, model, data)
    check_compatible([e.header() for e in experts], base.header() if base is not None else None, check_values=False)
    layout = experts[0].header()
    started = time.perf_counter()
    bar = _progress_bar() if progress else nullcontext()
    with bar:
        if check_values:
            named = [(describe(e, f"expert {j}"), e) for j, e in enumerate(experts)]
            if base is not None:
                named.insert(0, (describe(base, "base"), base))
            task = _add_task(bar, "checking values", len(named) * len(layout))
            for name, state in named:
                for key in layout:
                    check_finite(state[key], key, name)
                    _advance(bar, task)
        task = _add_task(bar, f"{method.name}: prepare", None)
        context = method.prepare(experts, base, model=model, data=data)
        _finish(bar, task)
        task = _add_task(bar, f"{method.name}: merge", len(layout))

        def merged_entries() -> Iterator[tuple[str, Tensor]]:
            for key in layout:
                base_value = base[key] if base is not None else None
                yield key, method.merge_entry(key, _EntryValues(experts, key), base_value, context)
                _advance(bar, task)

        stream_safetensors(out_path, layout, merged_entries(), metadata)
    log.info(
        "%s: merged %d experts into %s (%d tensors) in %.1f s",
        method.name,
        len(experts),
        out_path,
        len(layout),
        time.perf_counter() - started,
    )
    return out_path


class _EntryValues(Sequence):
    """One entry's values across lazy state dicts, each read when it is indexed (not cached)."""

    def __init__(self, states: Sequence[Mapping[str, Tensor]], key: str) -> None:
        self.states = states
        self.key = key

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self.states[i][self.key] for i in range(*j.indices(len(self)))]
        return self.states[j][self.key]


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _add_task(bar: Progress | nullcontext, description: str, total: int | None) -> Any:
    return bar.add_task(description, total=total) if isinstance(bar, Progress) else None


def _advance(bar: Progress | nullcontext, task: Any) -> None:
    if isinstance(bar, Progress):
        bar.advance(task)


def _finish(bar: Progress | nullcontext, task: Any) -> None:
    if isinstance(bar, Progress):
        bar.update(task, total=1, completed=1)


# ------------------------------------------------------------------------------ CLI


def parse_hparams(items: Sequence[str]) -> dict[str, Any]:
    """``["density=0.2", "scope=tensor"]`` -> ``{"density": 0.2, "scope": "tensor"}``.

    Values are parsed with ``yaml.safe_load`` (numbers, booleans, ``null``, lists).

    Raises:
        ValueError: an item has no ``=`` or an empty name.
    """
    hparams: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"hyperparameter {item!r} is not of the form name=value")
        hparams[name.strip()] = yaml.safe_load(value)
    return hparams


RUN_WITH_DATA: dict[str, str] = {
    "mties": "merging test --config configs/merge/mties.yaml",
    "mudsc": "merging test --config configs/merge/mudsc.yaml",
    "neulig": "merging fit --config configs/neulig/digits.yaml",
}
"""The command that runs each method needing a model and data (which files alone do not give)."""


def streamable_methods() -> list[str]:
    """Methods :func:`merge_files` can run: per-entry merges that need neither a model nor data."""
    return [name for name in available_methods() if _streamable(type(get_method(name)))]


def _streamable(cls: type[MergeMethod]) -> bool:
    return cls.merge is MergeMethod.merge and not (cls.requires_model or cls.requires_data)


def build_parser() -> argparse.ArgumentParser:
    """The ``merging merge`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="merging merge",
        description="Merge expert safetensors files into one, streamed tensor by tensor "
        "(peak memory about K tensors, not K models).",
    )
    others = sorted(set(available_methods()) - set(streamable_methods()))
    parser.add_argument("--experts", nargs="+", required=True, metavar="FILE", help="θ_1..θ_K, *.safetensors")
    parser.add_argument("--base", metavar="FILE", help="θ₀, the pretrained weights (*.safetensors)")
    parser.add_argument(
        "--method",
        required=True,
        help=f"one of: {', '.join(streamable_methods())} ({', '.join(others)} need a model and data: "
        "run them with a model and data config, e.g. merging test --config configs/merge/mties.yaml)",
    )
    parser.add_argument(
        "--hparams", nargs="*", default=[], metavar="NAME=VALUE", help="method hyperparameters, e.g. density=0.2"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="merged *.safetensors (written atomically)")
    parser.add_argument("--no-check-values", action="store_true", help="skip the NaN/inf pass over the inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_method(name: str, items: Sequence[str]) -> MergeMethod:
    """The merge method ``name`` with its ``--hparams`` ``NAME=VALUE`` items.

    Each value is parsed with ``yaml.safe_load``; the method's ``__init__`` checks its type
    and range and names the argument.

    Raises:
        ValueError: unknown method, unknown hyperparameter (the message lists the method's),
            a value of the wrong type, or one the method refuses; every message names the key.
    """
    cls = type(get_method(name))
    hparams = parse_hparams(items)
    signature = inspect.signature(cls.__init__)
    accepted = {k: p for k, p in signature.parameters.items() if k != "self"}
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"--hparams: {name} has no hyperparameter {', '.join(map(repr, unknown))}; it takes {_defaults(accepted)}"
        )
    try:
        return cls(**hparams)
    except (TypeError, ValueError) as err:
        given = " ".join(f"{k}={v!r}" for k, v in hparams.items())
        raise ValueError(f"--hparams {given}: {err} (defaults: {_defaults(accepted)})") from err


def _defaults(parameters: Mapping[str, inspect.Parameter]) -> str:
    return ", ".join(f"{k}={p.default!r}" for k, p in parameters.items()) or "none"


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    inputs = [*args.experts, *([args.base] if args.base else [])]
    out = Path(args.out).resolve()
    for path in inputs:
        if Path(path).resolve() == out or (out.exists() and Path(path).exists() and os.path.samefile(path, out)):
            parser.error(f"--out {args.out} is also an input ({path}); the merge would replace a file it reads")
    if len(args.experts) == 1:
        sys.stderr.write(
            f"{parser.prog}: warning: one expert given ({args.experts[0]}): {args.method} of one expert is that "
            "expert (or θ₀ plus its scaled task vector); pass the other experts with --experts A B ...\n"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``merging merge`` (argument errors exit with status 2, input errors with 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.method in available_methods() and not _streamable(type(get_method(args.method))):
        hint = RUN_WITH_DATA.get(args.method, "a MergedModule config with merging test --config ...")
        parser.error(
            f"--method {args.method} needs the experts' model and unlabeled input batches, which safetensors files "
            f"alone do not give, so merging merge cannot run it. Run it on an expert bundle with a model and data "
            f"config: {hint}; or in Python: get_method({args.method!r}).merge(experts, base, model=..., data=...)"
        )
    try:
        method = build_method(args.method, args.hparams)
    except ValueError as err:
        parser.error(str(err))
    _check_paths(parser, args)
    try:
        merge_files(
            method,
            args.experts,
            args.out,
            args.base,
            check_values=not args.no_check_values,
            metadata={"method": repr(method), "experts": json.dumps(args.experts)},
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


__all__ = [
    "LazySafetensors",
    "RUN_WITH_DATA",
    "SAFETENSORS_DTYPES",
    "build_method",
    "merge_files",
    "parse_hparams",
    "stream_safetensors",
    "streamable_methods",
]


if __name__ == "__main__":
    main(sys.argv[1:])
