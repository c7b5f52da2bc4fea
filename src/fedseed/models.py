"""Loading Hugging Face models and keeping a party's copy of the federated model.

:func:`load_model` accepts a local folder or a Hub id (``trust_remote_code`` stays
off unless the user asks for it). :class:`LocalModel` is what algorithms receive:
the module, its trainable tensors in a fixed order, the base weights ``w0`` kept
in float32 for algorithms that rebuild ``w = w0 + sum c_k D(seed_k)`` from scratch,
and the ledger position the copy is synced to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedseed.directions import DirectionSpace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
DIRTY = -1  # position of a copy whose weights were changed locally since its last sync
FINGERPRINT_TAG = 0xF1A6


class ModelError(ValueError):
    """A model could not be loaded; the text says which and how to fix it."""


PACKAGE_PREFIX = "python:"


def resolve(name_or_path: str) -> str:
    """``python:pkg/sub/dir`` names a model folder shipped inside an installed Python package."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    import importlib.util

    package, _, rest = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"`model.name_or_path` {name_or_path!r}: Python package {package!r} is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def load_model(name_or_path: str, *, task: str = "causal-lm", dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, num_labels: int = 2, seed: int = 0):
    """Load ``(model, tokenizer)`` with ``from_pretrained``.

    ``task`` is ``"causal-lm"`` or ``"classification"`` (a sequence-classification
    head on an encoder, as in the GLUE experiments). A new classification head is
    initialised from ``seed``, so every party of a run starts from the same weights.
    """
    name_or_path = resolve(name_or_path)
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
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
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
    model.eval()  # no dropout: a zeroth-order step compares two forwards of the same function
    return model, tokenizer


def content_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    """

    module: torch.nn.Module
    trainable: list[tuple[str, torch.nn.Parameter]]
    position: int = 0
    _base: list[torch.Tensor] = field(default_factory=list, repr=False)
    _spaces: dict[str, DirectionSpace] = field(default_factory=dict, repr=False)

    @classmethod
    def wrap(cls, module: torch.nn.Module) -> "LocalModel":
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        base = [p.detach().to(torch.float32).clone() for _, p in named]
        return cls(module=module, trainable=named, _base=base)

    @property
    def base(self) -> list[torch.Tensor]:
        """``w0`` in float32, captured when the model was wrapped, before any update."""
        return self._base

    def retarget(self, trainable: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Make ``trainable`` the tensors algorithms update (e.g. LoRA adapters) and their current values ``w0``."""
        self.trainable = trainable
        self._base = [p.detach().to(torch.float32).clone() for _, p in trainable]
        self._spaces.clear()

    def directions(self, distribution: str) -> DirectionSpace:
        """The direction space over the trainable tensors (built once per distribution)."""
        if distribution not in self._spaces:
            self._spaces[distribution] = DirectionSpace(self.trainable, distribution)
        return self._spaces[distribution]

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
