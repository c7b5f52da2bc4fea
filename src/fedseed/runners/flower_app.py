"""fedseed's Flower app: the ServerApp and ClientApp that ``flower/pyproject.toml`` names.

Thin entry points only. The ServerApp runs :func:`~fedseed.runners.flower_server.run_server`
(the round loop), the ClientApp answers ``train`` instructions and ``query`` roll
calls with :mod:`~fedseed.runners.flower_client`. Any fedseed algorithm runs
through them unchanged: neither side knows which one it moves messages for.
The heavy imports (torch, transformers) happen inside the handlers, so a roll
call, which Flower answers in a fresh process, stays quick.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from fedseed.memory import set_forward_threshold
    from fedseed.runners.flower_server import run_server

    set_forward_threshold()
    run_server(grid, context.run_config)


@client.train()
def train(msg: Message, context: Context) -> Message:
    from fedseed.memory import set_forward_threshold
    from fedseed.runners.flower_client import train_handler

    set_forward_threshold()
    return train_handler(msg, context)


@client.query()
def roll_call(msg: Message, context: Context) -> Message:
    from fedseed.runners.flower_client import roll_call_handler

    return roll_call_handler(msg, context)
