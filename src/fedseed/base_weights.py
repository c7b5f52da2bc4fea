"""Where a party's base weights ``w0`` live: on disk, read back tensor by tensor.

Every seed method rebuilds ``w = w0 + sum_k c_k D(seed_k)``, so every party needs
``w0``. Holding it in memory would double what a client holds (and a float32 copy
of a 16-bit model would triple it), yet it is already on disk: ``transformers``
loads a model from its safetensors files, and a freshly loaded tensor's bytes are
the file's bytes. :class:`BaseWeights` finds, for every trainable tensor, a
safetensors file and key holding exactly its bytes, and reads them back when a
rebuild needs them, a group of tensors at a time:

1. the model folder's own ``*.safetensors`` files (a local folder, or the Hub
   cache for a Hub id), under the tensor's name or without the model's
   ``base_model_prefix``;
2. for every tensor not found there with identical bytes (weights converted to
   another dtype at load, a freshly initialised classification head, LoRA
   adapters), a copy fedseed writes once, in parts of at most ``PART_BYTES``, into
   its cache folder, named by a digest of the tensors so a later run reuses it.

Reads go through ``safetensors.safe_open``, which memory-maps the file: a read is
the page cache's pages mapped into this process, not a copy. While mapped those
pages count in the resident set, so :meth:`BaseWeights.read` maps one group
(``GROUP_BYTES``) at a time and unmaps it before the next. This module knows
nothing of directions or algorithms.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

GROUP_BYTES = 64 << 20  # tensors mapped at once by a rebuild
PART_BYTES = 256 << 20  # largest file of fedseed's own copy (a CUDA model's part is staged on the CPU)
CACHE_ENV = "FEDSEED_CACHE"


class BaseWeightsError(ValueError):
    """The base weights cannot be found or written; the text says where and what to do."""


def default_cache_dir() -> Path:
    """``$FEDSEED_CACHE``, else ``~/.cache/fedseed``: where fedseed writes base copies it needs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedseed").expanduser()


@dataclass(frozen=True)
class Source:
    """One tensor's ``w0``: a key in a safetensors file."""

    file: Path
    key: str


def _model_files(folder: str | None) -> dict[str, Path]:
    """Every tensor key of the model folder's safetensors files, and its file (empty when there is no folder)."""
    if not folder:
        return {}
    local = Path(folder).expanduser()
    path = local if local.is_dir() else _hub_snapshot(folder)
    if path is None:
        return {}
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            keys.update({k: file for k in f.keys()})
    return keys


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hub model that ``from_pretrained`` already downloaded, if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # not a Hub id, not cached, no huggingface_hub: fedseed writes its own copy
        return None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class BaseWeights:
    """``w0`` of an ordered list of tensors, on disk.

    Parameters
    ----------
    sources:
        One :class:`Source` per tensor, in the order of the tensors it was located for.
    shapes, dtypes:
        What each tensor is, so that a read returns tensors shaped like the originals.
    """

    def __init__(self, sources: Sequence[Source], shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype]):
        self.sources, self.shapes, self.dtypes = list(sources), list(shapes), list(dtypes)

    @classmethod
    def locate(cls, named: Sequence[tuple[str, torch.Tensor]], folder: str | None, cache_dir: Path | None = None,
               prefix: str = "") -> "BaseWeights":
        """Find (or write once) a file holding each tensor's current bytes.

        ``folder`` is the model's local folder or Hub id (``None``: none); ``prefix``
        its ``base_model_prefix``, which checkpoints of the bare model leave out.
        """
        keys = _model_files(folder)
        sources: list[Source | None] = []
        for name, t in named:
            candidates = [name] + ([name[len(prefix) + 1:]] if prefix and name.startswith(prefix + ".") else [])
            sources.append(next((Source(keys[k], k) for k in candidates if k in keys), None))
        shapes, dtypes = [t.shape for _, t in named], [t.dtype for _, t in named]
        base = cls([s or Source(Path(), "") for s in sources], shapes, dtypes)
        found = [j for j, s in enumerate(sources) if s is not None]
        same = set(base._matching(found, [t for _, t in named]))
        missing = [j for j in range(len(named)) if j not in same]
        if missing:
            written = _write_copy([named[j] for j in missing], cache_dir or default_cache_dir())
            for j, source in zip(missing, written):
                base.sources[j] = source
        return base

    def _matching(self, rows: list[int], tensors: Sequence[torch.Tensor]) -> Iterator[int]:
        """The rows whose file holds exactly the tensor's bytes (compared a group at a time)."""
        for group in self.groups(rows):
            with self.read(group, check=False) as files:
                for j, stored in zip(group, files):
                    t = tensors[j]
                    if stored is not None and stored.shape == t.shape and stored.dtype == t.dtype and \
                            torch.equal(_bytes(stored), _bytes(t.detach().cpu())):
                        yield j

    def groups(self, rows: Sequence[int] | None = None, max_bytes: int = GROUP_BYTES) -> list[list[int]]:
        """``rows`` (default: all) cut into consecutive groups of at most ``max_bytes`` (a larger tensor alone)."""
        rows = list(range(len(self.sources))) if rows is None else list(rows)
        sizes = [self.shapes[j].numel() * self.dtypes[j].itemsize for j in rows]
        return [[rows[i] for i in group] for group in consecutive_groups(sizes, max_bytes)]

    @contextmanager
    def read(self, rows: Sequence[int], check: bool = True) -> Iterator[list[torch.Tensor]]:
        """The ``w0`` of ``rows`` as memory-mapped CPU tensors, unmapped on exit (keep no reference).

        ``check`` (default) raises :class:`BaseWeightsError` when a file no longer
        holds the tensor it was located for (deleted, replaced by another model).
        """
        from safetensors import safe_open

        tensors: list[torch.Tensor | None] = []
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for j in rows:
                source = self.sources[j]
                if not source.key:
                    tensors.append(None)
                    continue
                try:
                    if source.file not in handles:
                        handles[source.file] = stack.enter_context(safe_open(source.file, "pt"))
                    stored = handles[source.file].get_tensor(source.key)  # type: ignore[attr-defined]
                except Exception as e:  # OSError, SafetensorError: a missing, truncated or replaced file
                    if check:
                        raise BaseWeightsError(f"the base weight {source.key!r} cannot be read from {source.file}: "
                                               f"{e}; it was there when the model was loaded: restore the file, or "
                                               "delete fedseed's cache folder and load the model again") from None
                    stored = None
                if check and (stored is None or stored.shape != self.shapes[j] or stored.dtype != self.dtypes[j]):
                    raise BaseWeightsError(f"{source.file} no longer holds the base weight {source.key!r} as a "
                                           f"{tuple(self.shapes[j])} {self.dtypes[j]} tensor; it was replaced since "
                                           "the model was loaded")
                tensors.append(stored)
            try:
                yield tensors  # type: ignore[misc]
            finally:
                tensors.clear()  # the mappings close with the handles only once no tensor refers to them

    def delete(self) -> None:
        """Remove the files this base reads (a snapshot's scratch files; never call it on a model's own)."""
        for file in {s.file for s in self.sources if s.key}:
            file.unlink(missing_ok=True)

    @property
    def own_files(self) -> list[Path]:
        """The files of fedseed's own copy that this base reads (empty when the model's files hold everything)."""
        return sorted({s.file for s in self.sources if s.file.name.startswith("base-")})


def _digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t.detach().cpu()).numpy().data)
    return h.hexdigest()[:24]


def _write_copy(named: Sequence[tuple[str, torch.Tensor]], cache_dir: Path) -> list[Source]:
    """Write ``named`` into ``cache_dir/base-<digest>-<part>.safetensors`` (once: existing parts are reused)."""
    return _write_parts(named, cache_dir, f"base-{_digest(named)}", reuse=True)


def snapshot(named: Sequence[tuple[str, torch.Tensor]], folder: Path) -> BaseWeights:
    """The tensors' current values written to ``folder`` (a scratch copy on disk, not in memory)."""
    return BaseWeights(_write_parts(named, folder, "snapshot", reuse=False), [t.shape for _, t in named],
                       [t.dtype for _, t in named])


def consecutive_groups(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of ``sizes`` in runs whose sizes sum to at most ``limit``; an item above ``limit`` is a run alone."""
    groups: list[list[int]] = []
    filled = 0
    for i, n in enumerate(sizes):
        if groups and filled + n <= limit:
            groups[-1].append(i)
            filled += n
        else:
            groups.append([i])
            filled = n
    return groups


def _parts(named: Sequence[tuple[str, torch.Tensor]]) -> list[list[int]]:
    return consecutive_groups([t.numel() * t.element_size() for _, t in named], PART_BYTES)


def _write_parts(named: Sequence[tuple[str, torch.Tensor]], folder: Path, stem: str, reuse: bool) -> list[Source]:
    """``folder/<stem>-<part>.safetensors``, each written atomically; ``reuse`` keeps a complete existing part."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BaseWeightsError(f"cannot create fedseed's cache folder {folder} ({e}); set {CACHE_ENV} to a "
                               "writable folder") from None
    sources: list[Source] = [Source(Path(), "")] * len(named)
    for p, rows in enumerate(_parts(named)):
        file = folder / f"{stem}-{p}.safetensors"
        complete = False
        if reuse:
            try:
                with safe_open(file, "pt") as f:
                    complete = f.metadata().get("stem") == stem and set(f.keys()) == {named[j][0] for j in rows}
            except Exception:
                complete = False
        if not complete:
            tensors = {named[j][0]: named[j][1].detach().cpu().contiguous() for j in rows}
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata={"stem": stem})
                os.replace(tmp, file)  # another process writing the same part leaves the same bytes
            except OSError as e:
                Path(tmp).unlink(missing_ok=True)
                raise BaseWeightsError(f"cannot write {file} ({e}); free disk space or set {CACHE_ENV} to another "
                                       "folder") from None
            del tensors
        for j in rows:
            sources[j] = Source(file, named[j][0])
    return sources
