"""torch.compile applied per decoder block, as torchtitan does.

Compiling each block (not the whole model) keeps the model's structure: pipeline parallelism still slices
``layers``, activation checkpointing (inside ``Block.forward``) still wraps one block, and the blocks share one
compiled graph since they run the same code on parameters of the same shapes.

A block with a mixture-of-experts feed-forward is compiled without it: its norms and mixer are compiled, the MoE
layer runs eager. torch 2.13 has no compile path for the fp32 grouped GEMM (the compiled layer falls back to the
per-expert loop, which reads the routing counts to the host), and with the GEMM made opaque the compiled
index-based dispatch was still slower than eager: d_model 256, 4 layers, 4 experts on CPU, 0.204 s a step
against 0.188 eager; with the MoE layer left eager, 0.176 against 0.184 (`bench/bench_train_step.py --compile`).
"""

from __future__ import annotations

from model.transformer import Transformer


def compile_blocks(model: Transformer, **compile_kwargs) -> None:
    """Compiles every block of ``model`` in place (``nn.Module.compile``: the module objects and their parameter
    names stay, so checkpoints, sharding and optimizers see the same model); in MoE blocks, all but the MoE layer."""
    for block in model.layers:
        if block.is_moe:
            for part in (block.mixer_norm, block.mixer, block.ffn_norm):
                part.compile(**compile_kwargs)
        else:
            block.compile(**compile_kwargs)
