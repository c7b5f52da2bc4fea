"""Loading Hugging Face models and keeping a party's copy of the federated model.

:func:`load_model` accepts a local folder or a Hub id (``trust_remote_code`` stays
off unless the user asks for it). :class:`LocalModel` is what algorithms receive:
the module, its trainable tensors in a fixed order, the base weights ``w0`` kept
in float32 for algorithms that rebuild ``w = w0 + sum c_k D(seed_k)`` from scratch,
and the ledger position the copy is synced to.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from fedseed.base_weights import BaseWeights, default_cache_dir
from fedseed.directions import DirectionSpace
from fedseed.locations import LocationError, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
DIRTY = -1  # position of a copy whose weights were changed locally since its last sync
FINGERPRINT_TAG = 0xF1A6


class ModelError(ValueError):
    """A model could not be loaded; the text says which and how to fix it."""


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def load_model(name_or_path: str, *, task: str = "causal-lm", dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, num_labels: int = 2, seed: int = 0):
    """Load ``(model, tokenizer)`` with ``from_pretrained``.

    ``task`` is ``"causal-lm"`` or ``"classification"`` (a sequence-classification
    head on an encoder, as in the GLUE experiments). A new classification head is
    initialised from ``seed``, so every party of a run starts from the same weights.
    """
    try:
        name_or_path = resolve(name_or_path)
    except LocationError as e:
        raise ModelError(f"`model.name_or_path` {e}") from None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"`model.dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device not in DEVICES:
        raise ModelError(f"`run.device` must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("`run.device` is 'cuda' but no CUDA device is visible; use device = \"cpu\"")
    if _looks_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model folder {folder} not found or has no config.json; set `model.name_or_path` to a "
                "Hugging Face model folder (config.json + weights) or a Hub id such as 'openlm-research/open_llama_3b'"
            )
    kwargs: dict[str, Any] = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if task == "classification":
            with torch.random.fork_rng():  # model initialisation only; protocol randomness never uses torch's RNG
                torch.manual_seed(seed)
                model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load model {name_or_path!r}: {e}") from None
    model.to(device)
    model.eval()  # no dropout, for every method: see fedavg.first_order_steps
    return model, tokenizer


@contextmanager
def checkpointed_layers(module: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing of every transformer layer, the model staying in eval mode.

    A backward through a billion-parameter model otherwise keeps every layer's
    activations, more memory than the weights' share of a 256-token batch; with
    each layer recomputed in the backward only one layer's activations live at a
    time. transformers' own switch (``gradient_checkpointing_enable``) acts only
    in train mode, which would turn dropout on; this wraps each layer's forward in
    ``torch.utils.checkpoint`` instead (non-reentrant, so ``torch.autograd.grad``
    works) and turns the KV cache off, which a recomputed layer would write twice.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    config = getattr(module, "config", None)
    use_cache = getattr(config, "use_cache", None)
    for layer in layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


def content_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory: no copy
    return h.hexdigest()


@dataclass
class LocalModel:
    """One party's copy of the federated model.

    Parameters
    ----------
    module:
        The ``transformers`` model, in eval mode.
    trainable:
        ``(name, parameter)`` pairs the algorithm may change, in ``named_parameters`` order.
    base:
        Where ``w0`` of the trainable tensors lives on disk (:class:`~fedseed.base_weights.BaseWeights`):
        nothing of it is held in memory, so a party holds one copy of the weights.
    """

    module: torch.nn.Module
    trainable: list[tuple[str, torch.nn.Parameter]]
    base: BaseWeights
    cache_dir: Path  # where fedseed writes what it keeps on disk for this copy (base copies, snapshots)
    position: int = 0
    _spaces: dict[str, DirectionSpace] = field(default_factory=dict, repr=False)

    @classmethod
    def wrap(cls, module: torch.nn.Module, source: str | None = None, cache_dir: Path | None = None) -> "LocalModel":
        """A freshly loaded ``module``; ``source`` is the folder or Hub id it was loaded from (where ``w0`` is).

        Without a source, or for tensors the source does not hold as loaded,
        fedseed writes ``w0`` once into its cache folder (``cache_dir``).
        """
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        folder = resolve(source) if source else None
        prefix = getattr(module, "base_model_prefix", "") or ""
        cache_dir = cache_dir or default_cache_dir()
        return cls(module, named, BaseWeights.locate(named, folder, cache_dir, prefix), cache_dir)

    def retarget(self, trainable: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Make ``trainable`` the tensors algorithms update (e.g. LoRA adapters) and their current values ``w0``."""
        self.trainable = trainable
        self.base = BaseWeights.locate(trainable, None, self.cache_dir)
        self._spaces.clear()

    def directions(self, distribution: str, precision: str = "nearest") -> DirectionSpace:
        """The direction space over the trainable tensors (built once per distribution and precision)."""
        key = f"{distribution}/{precision}"
        if key not in self._spaces:
            self._spaces[key] = DirectionSpace(self.trainable, distribution, precision)
        return self._spaces[key]

    @torch.no_grad()
    def rebuild_(self, distribution: str, seeds: Sequence[int] | np.ndarray, coeffs: Sequence[float] | np.ndarray,
                 rows: Sequence[int] | None = None) -> None:
        """``w = w0 + sum_k coeffs[k] D(seeds[k])`` for the trainable tensors ``rows`` (default all).

        One pass: the kernels read ``w0`` from the memory-mapped base files and
        write the weights, a group of tensors at a time, so no parameter-sized
        temporary exists. The sum is float32 in seed order and rounded once into
        the weights' dtype, so every party gets the same bits.
        """
        space = self.directions(distribution)
        for group in self.base.groups(rows):
            with self.base.read(group) as w0:
                space.subset(group).add_(seeds, coeffs, base=w0)

    @torch.no_grad()
    def reset_(self, rows: Sequence[int] | None = None) -> None:
        """``w = w0`` for the trainable tensors ``rows`` (default all), read back from disk."""
        for group in self.base.groups(rows):
            with self.base.read(group) as w0:
                for j, stored in zip(group, w0):
                    self.trainable[j][1].copy_(stored)

    @torch.no_grad()
    def fingerprint(self, seed: int, position: int, samples: int) -> int:
        """A 64-bit hash of ``samples`` trainable elements drawn from ``(seed, position)``; 0 when ``samples`` is 0.

        Every party holding the global model at ``position`` gets the same number
        (the weights are bitwise identical by construction), so a different number
        means a copy that drifted. Sampling keeps it cheap on any model; drawing a
        new sample at every position means a fault in a few weights that one round's
        sample misses is met by a later round's.
        """
        if samples <= 0:
            return 0
        sizes = [p.numel() for _, p in self.trainable]
        picks = np.random.default_rng([seed, FINGERPRINT_TAG, max(position, 0)]).integers(0, sum(sizes), samples)
        picks = np.unique(picks)  # ascending
        digest = hashlib.blake2b(digest_size=8)
        bounds = np.cumsum([0, *sizes])
        for (name, p), lo, hi in zip(self.trainable, bounds[:-1], bounds[1:]):
            mine = picks[(picks >= lo) & (picks < hi)] - lo
            if mine.size:
                index = torch.from_numpy(mine).to(p.device)
                values = p.detach().reshape(-1)[index].to(torch.float32).cpu().numpy()
                digest.update(name.encode() + values.tobytes())
        return int.from_bytes(digest.digest(), "little")

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.trainable)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of one batch (tokens with label -100 excluded)."""
        device = next(self.module.parameters()).device
        return self.module(**{k: v.to(device) for k, v in batch.items()}).loss

    def example_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's own mean loss, (B,): what example-level privacy clips one example at a time."""
        device = next(self.module.parameters()).device
        labels = batch["labels"].to(device)
        logits = self.module(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()
        if labels.dim() == 1:  # classification
            return F.cross_entropy(logits, labels, reduction="none")
        labels = labels[:, 1:]  # causal LM: position t predicts token t + 1
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return per_token.sum(dim=1) / (labels != -100).sum(dim=1).clamp(min=1)

    def joint_loss(self, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[float]]:
        """The mean of :meth:`loss` over ``batches``, from one forward over them stacked; and each one's loss.

        Accumulating gradients batch by batch keeps a gradient the size of the
        weights alive until the last batch's backward. One backward through the
        stacked batches (right-padded, padding masked) completes each tensor's
        gradient once, so a hook can use it and drop it at once (Ferret's fused
        SGD). The loss is what the model's own loss computes per batch (float32
        cross-entropy; causal LMs over shifted labels, -100 excluded), averaged.
        """
        device = next(self.module.parameters()).device
        width = max(b["input_ids"].shape[1] for b in batches)

        def stacked(key: str) -> torch.Tensor:  # (sum of B, width)
            return torch.cat([F.pad(b[key], (0, width - b[key].shape[1])) for b in batches]).to(device)

        logits = self.module(input_ids=stacked("input_ids"), attention_mask=stacked("attention_mask")).logits
        losses, row = [], 0
        for b in batches:
            part, labels = logits[row: row + len(b["labels"])].float(), b["labels"].to(device)
            row += len(labels)
            if labels.dim() == 2:  # causal LM: position t predicts token t + 1
                labels = F.pad(labels, (0, width + 1 - labels.shape[1]), value=-100)[:, 1:]
                part = part.reshape(-1, part.shape[-1])
            losses.append(F.cross_entropy(part, labels.reshape(-1) if labels.dim() == 2 else labels,
                                          ignore_index=-100))
        joint = torch.stack(losses).mean()
        return joint, [float(loss.detach()) for loss in losses]
