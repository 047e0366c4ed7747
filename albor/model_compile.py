"""The ``compile`` lever: torch.compile of each decoder layer, and whether a run uses it.

Each ``DecoderLayer`` is compiled on its own (``module.compile()``), as
torchtitan does, and nothing else:

* the layers are where the fusion pays (RMSNorm, RoPE, SwiGLU, the residual
  adds: memory-bound chains of small kernels); the embedding and the head are
  one matmul each, and the chunked loss (albor.loss) loops over chunks;
* identical layers share one compiled graph (dynamo guards on the parameters'
  shapes, not on the module), so compile time is that of one layer, and a
  change of mode (validation's ``eval``/``no_grad``) adds one graph, not one per layer;
* DeepSpeed's engine stays eager around them: ZeRO-2's gradient hooks
  (``register_post_accumulate_grad_hook`` on each parameter) fire as the
  compiled backward hands each leaf its gradient, exactly as in eager mode;
* ``module.compile()`` compiles in place, so parameter names, ``state_dict``
  and every file albor writes are unchanged (``torch.compile(layer)`` would
  wrap it and add ``_orig_mod.`` to every name).

``fullgraph=True``: a layer that did not compile into one graph would run
partly eager and slower without a word; it fails the first step instead.
Compilation happens on the first forward, and inductor caches the result on
disk for the next run (15-20 s per model on 2 CPU cores from an empty cache,
1-3 s from the cache: benchmarks/bench_compile.py).
"""

from __future__ import annotations

import logging

from albor.distributed.compat import inductor_deterministic, inductor_problem
from albor.errors import UnsupportedEnvironmentError
from albor.model.llama import AlborLlama

log = logging.getLogger("albor")


def resolve_compile(requested: bool | None, device_type: str) -> bool:
    """Whether a run compiles: ``requested`` (the config's ``compile``) on ``device_type``.

    None (auto) compiles on a CUDA device where inductor can, and never on a CPU,
    where compiling costs more than it saves on a run of albor's sizes. True
    where inductor cannot compile raises UnsupportedEnvironmentError (exit 6),
    before anything is built; False never compiles.
    """
    if requested is False:
        return False
    if requested is None and device_type != "cuda":
        return False
    problem = inductor_problem(device_type)
    if problem is None:
        return True
    if requested:
        raise UnsupportedEnvironmentError(f"--compile: {problem}; or run without --compile")
    log.info("albor: not compiling (auto): %s", problem)
    return False


def compile_layers(model: AlborLlama, *, deterministic: bool) -> int:
    """Compile every decoder layer of ``model`` in place (on its first call); returns how many.

    ``deterministic`` also puts inductor in its deterministic mode: under
    ``torch.use_deterministic_algorithms`` its generated kernels must not be
    chosen by timing, which could change a reduction's order from run to run.
    """
    inductor_deterministic(deterministic)
    layers = model.model.layers
    for layer in layers:
        layer.compile(fullgraph=True)
    return len(layers)
