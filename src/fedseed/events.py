"""Progress hooks: the runners call them, the CLI draws them. The default draws nothing.

Kept apart from the runners so the CLI can subclass them without importing torch.
"""

from __future__ import annotations

from typing import Any


class Events:
    def round_start(self, round: int, clients: list[int]) -> None: ...
    def client_done(self, round: int, client: int) -> None: ...
    def round_end(self, row: dict[str, Any]) -> None: ...
    def phase(self, text: str, total: int = 0) -> None: ...
    def advance(self, n: int = 1) -> None: ...


def training_summary(row: dict[str, Any]) -> str:
    """A round line's training part: the clients' mean loss, or with privacy on the epsilon spent instead.

    With privacy the clients' losses are not released (nothing privatised them).
    """
    if "epsilon" in row:
        return f"epsilon {row['epsilon']:.3f}"
    if "example_epsilon" in row:
        return f"example epsilon {row['example_epsilon']:.3f}"
    return f"train loss {row['train_loss']:.4f}"
