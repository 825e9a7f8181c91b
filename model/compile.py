"""torch.compile applied per decoder block, as torchtitan does.

Compiling each block (not the whole model) keeps the model's structure: pipeline parallelism still slices
``layers``, activation checkpointing (inside ``Block.forward``) still wraps one block, and the blocks share one
compiled graph since they run the same code on parameters of the same shapes.
"""

from __future__ import annotations

from model.transformer import Transformer


def compile_blocks(model: Transformer, **compile_kwargs) -> None:
    """Compiles every block of ``model`` in place (``nn.Module.compile``: the module objects and their parameter
    names stay, so checkpoints, sharding and optimizers see the same model)."""
    for block in model.layers:
        block.compile(**compile_kwargs)
