"""The quantized path handed to llm-compressor's sequential pipeline (``realign_stream``; not in the paper).

The sequential pipeline (``llmcompressor.pipelines.sequential``) runs each subgraph twice: a
calibration pass (the Modifiers' hooks see the layer in full precision), ``sequential_epoch_end``,
then a propagation pass whose outputs become the next subgraph's inputs. A Q-VLM block of several
decoder layers is quantized only when its *last* layer's epoch ends, so the pipeline propagates the
block's first layers in full precision. From the first multi-layer block on, the activations the
pipeline feeds the later layers are then neither the FP model's nor the quantized model's: the
entropy of Eq. 4 is measured on them, and GPTQ's Hessians cannot be taken from them
(:class:`~qvlm_modifiers.qvlm.gptq_rounding.PipelineHessians` refuses, so they cost a pass of their
own). Eq. 1 defines the quantized path ``X_q^(k+1) = Q_k(W_q^(k) X_q^(k))``.

:class:`BlockHandover` realigns the pipeline with that path: in the propagation pass of a closed
block's last layer, a forward hook replaces the pipeline's output by the Modifier's own
quantized-path output of the block, batch by batch (the pipeline's batches come in order).

It also saves the Modifier most of a layer pass per one-layer block. On an aligned stream, the
pipeline's propagation of a one-layer block *is* the block's quantized-path output (same layer, same
input, the kept weights written in place). So the Modifier runs the block's layer only on the rows it
needs before (the guard's held-out rows) and on batch 0, and takes the other rows from the pipeline
(``rows[b] is None`` marks them). Batch 0 is propagated first: the hook compares it with the
Modifier's own output, bit for bit (and so is every row the Modifier computed). If they differ (e.g. activation quantization, which the
pipeline's pass disables), the hook has the missing rows computed at once (``complete``) and hands
them over like the others; :attr:`BlockHandover.mismatch` tells the Modifier to recompute any row
already taken and to stop relying on the pipeline's outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BlockHandover"]


class BlockHandover:
    """One closed block's quantized-path output, handed to the pipeline's propagation pass of its
    last decoder layer.

    :param rows: per calibration batch, the block output on the quantized path, ``None`` for a row
        to take from the pipeline (filled in place as the pass goes, with ``keep`` applied)
    :param complete: computes every ``None`` row, in place (the Modifier's own pass); called when the
        pipeline's batch 0 differs from ``rows[0]``, or later when the pass did not happen
    :param keep: how a taken row is stored (detached, on the offload device)
    :param on_settled: called once with every row when the block settles (:meth:`settle`), e.g. to
        write the kept state's loss on all rows into the block's record
    """

    def __init__(self, rows: list[torch.Tensor | None], complete: Callable[[], object],
                 keep: Callable[[torch.Tensor], torch.Tensor],
                 on_settled: Callable[[list[torch.Tensor]], object] | None = None):
        if any(r is None for r in rows) and rows[0] is None:
            raise ValueError("batch 0 must be computed: it checks the pipeline's outputs before any row is taken")
        self.rows = rows
        self._complete = complete
        self._keep = keep
        self._on_settled = on_settled
        self.settled = False
        self.lazy = any(r is None for r in rows)  # some rows are to be taken from the pipeline
        self.taken: list[int] = []
        self.calls = 0
        self.mismatch = False

    @property
    def done(self) -> bool:
        """Every batch has been through the propagation pass."""
        return self.calls >= len(self.rows)

    def missing(self) -> bool:
        return any(r is None for r in self.rows)

    def complete(self, retake: bool = False) -> None:
        """Compute the rows still missing (the pipeline did not hand them over); ``retake``: also
        recompute those taken from the pipeline (after a mismatch on a later row)."""
        if retake:
            for b in self.taken:
                self.rows[b] = None
            self.taken = []
        if self.missing():
            self._complete()

    def settle(self, retake: bool = False) -> None:
        """Before anything reads the block's rows: :meth:`complete` them (``retake`` after a
        mismatch), then hand them to ``on_settled``. Once; later calls do nothing."""
        if self.settled:
            return
        self.complete(retake=retake)
        self.settled = True
        if self._on_settled is not None:
            self._on_settled(self.rows)

    def __call__(self, output):
        """The forward hook's body for one propagated batch: returns the output to propagate
        (``None``: keep the pipeline's)."""
        b = self.calls
        self.calls += 1
        if b >= len(self.rows):
            raise RuntimeError(f"QVLMModifier: the pipeline propagated {b + 1} batches, {len(self.rows)} were calibrated")
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        row = self.rows[b]
        if row is None:  # batch 0 matched: the pipeline computes exactly our row
            self.rows[b] = self._keep(hidden)
            self.taken.append(b)
            return None
        if self.lazy and not self.mismatch and not torch.equal(hidden, row.to(hidden.device)):
            self.mismatch = True  # the pipeline does not compute our rows: compute the rest ourselves
            self.complete()
        replaced = self.rows[b].to(device=hidden.device, dtype=hidden.dtype)
        if isinstance(output, tuple):
            return (replaced, *output[1:])
        if isinstance(output, list):
            return [replaced, *output[1:]]
        return replaced
