"""FedIT: federated instruction tuning with LoRA adapters (FedAvg on the adapters only).

:meth:`FedIT.bind` injects LoRA adapters into the loaded module in place
(``peft.inject_adapter_in_model``: the module stays the ``transformers`` model,
its targeted ``nn.Linear`` layers become LoRA layers, the base weights are
frozen) and makes the adapter tensors the model's trainable set and its ``w0``.
From then on FedIT is FedAvg: the downlink is the adapter weights, the uplink
their delta, and ``A`` and ``B`` are averaged separately as in FedIT.

Every party must start from the same adapters. peft draws ``A`` from torch's
global generator (on the CPU, before moving it to the model's device), so the
injection runs under ``torch.random.fork_rng`` with a seed derived from the run
seed: model initialisation, not protocol randomness, and the caller's generator
state is left as it was. ``B`` starts at zero, so the bound model computes what
the base model computes. LoRA dropout is fixed at 0: it would draw from torch's
global generator during local steps and make runs irreproducible.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedseed.algorithms.base import Batches
from fedseed.algorithms.dense import DenseAlgorithm, DenseTask, LocalRun
from fedseed.algorithms.fedavg import FedAvgConfig, first_order_steps
from fedseed.directions import derive_seed
from fedseed.models import LocalModel
from fedseed.settings import ConfigError, require_positive, setting

ADAPTER_TAG = 0xADA7
ADAPTER = "default"  # peft's adapter name; one adapter per model


@dataclass(frozen=True)
class FedITConfig(FedAvgConfig):
    """FedAvg's local training on LoRA adapters of ``rank`` on the ``target_modules`` layers."""

    lr: float = setting(1e-4, "local learning rate (adapters take a larger step than full fine-tuning)")
    rank: int = setting(8, "r: the adapters' inner dimension")
    alpha: float = setting(16.0, "the adapter output is scaled by alpha / rank")
    target_modules: str = setting("q_proj,v_proj", "comma-separated module name suffixes (Llama attention)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "algorithm", "rank", "alpha")
        names = self.targets
        if not names or any(not n.replace("_", "").replace(".", "").isalnum() for n in names):
            raise ConfigError(
                f"`algorithm.target_modules` must be comma-separated module names such as 'q_proj,v_proj', "
                f"got {self.target_modules!r}"
            )

    @property
    def targets(self) -> list[str]:
        return [n.strip() for n in self.target_modules.split(",") if n.strip()]


def lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    """The module's LoRA layers by qualified name (empty before injection)."""
    from peft.tuners.lora import LoraLayer  # peft takes seconds to import: only FedIT pays for it

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


class FedIT(DenseAlgorithm):
    """FedIT: the dense-delta protocol with LoRA adapters as the trainable tensors."""

    # fedseed compare's setting: LoRA r=8, alpha=16 on q_proj/v_proj (FedIT's usual setting); lr tuned here.
    compare: ClassVar[dict[str, Any]] = {"local_steps": 10, "lr": 1e-2, "rank": 8, "alpha": 16.0}

    name = "fedit"

    def bind(self, model: LocalModel) -> None:
        """Inject the adapters (once per model) and make them ``model.trainable`` and ``model.base``.

        The runner binds its server and client objects to the same model, so a
        second bind finds the adapters in place, checks they are this config's,
        and only captures ``w0``.
        """
        if lora_layers(model.module):
            self._check_adapters(model.module)
        else:
            self._inject(model)
        super().bind(model)

    def _inject(self, model: LocalModel) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self.config
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=0.0, bias="none")
        with torch.random.fork_rng(devices=[]):  # peft initialises A on the CPU from the global generator
            torch.manual_seed(derive_seed(self.seed, ADAPTER_TAG))
            try:
                inject_adapter_in_model(lora, model.module, adapter_name=ADAPTER)
            except ValueError as e:
                raise ValueError(f"`algorithm.target_modules` = {cfg.target_modules!r}: {e}") from None
        adapters = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
        # What LocalModel.wrap would build now that only the adapters require grad; the
        # direction spaces bound the old tensors, so they go too.
        model.retarget(adapters)

    def _check_adapters(self, module: torch.nn.Module) -> None:
        cfg = self.config
        for name, layer in lora_layers(module).items():
            if (layer.r.get(ADAPTER), layer.lora_alpha.get(ADAPTER)) != (cfg.rank, cfg.alpha):
                raise ValueError(
                    f"{name} already carries LoRA rank {layer.r.get(ADAPTER)}, alpha {layer.lora_alpha.get(ADAPTER)}; "
                    f"this FedIT has `algorithm.rank` {cfg.rank}, `algorithm.alpha` {cfg.alpha}: load a fresh model"
                )

    def local_steps(self, model: LocalModel, batches: Batches, task: DenseTask) -> LocalRun:
        return first_order_steps(model, batches, self.config)

    def export(self, model: LocalModel) -> torch.nn.Module:
        """A copy of the module with the adapters merged into the base weights, peft layers removed."""
        merged = copy.deepcopy(model.module)
        for name, layer in lora_layers(merged).items():
            layer.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer.get_base_layer())
        return merged
