"""The plasticity record: one schema for the test-time updates of every memory family.

A model whose memory changes while it reads (TTT's inner weights, Titans' neural memory, EMMA's holographic trace)
offers the hook ``src.protocols.CapturesPlasticity``:

* ``set_capture(True)`` makes the next forwards record how strongly each token writes into the memory, from
  tensors the forward already has; ``set_capture(False)`` stops and drops the records. While capture is off nothing
  extra is computed or kept.
* ``plasticity_records()`` returns the records of the latest forward with capture on: a list with one dict per
  memory layer (list index = layer), of detached float tensors on the model's device. It raises ``EngramError``
  when no captured forward has run.

One record, for B sequences, the H memory heads of the layer, the L tokens of the forward call and the M chunks the
call touched (a family with a single memory, like EMMA, has H = 1 and one layer):

=================  ===========  ================================================================================
key                shape        meaning
=================  ===========  ================================================================================
``update_norm``    [B, H, L]    required: how strongly token t writes into the memory (``TOKEN_METRICS``)
``delta_w_norm``   [B, H, M]    required: ‖M_end − M_start‖ of the memory state over each chunk
``position``       [L] int64    required: absolute token positions (0 at the first token of the sequence)
any other key      [B, H, L]    optional: a family metric named in ``TOKEN_METRICS``
                   [B, H, M]    or in ``CHUNK_METRICS``
=================  ===========  ================================================================================

A family emits the three required keys and whichever of the optional metrics it has; every layer of one capture
has the same keys. The chunk is the family's unit of update: TTT's mini-batch (``mini_batch_size``), Titans' chunk
(``chunk_size``), EMMA's fixed blocks of ``EmmaConfig.plasticity_chunk`` tokens (its trace changes every token, so
the block only sets the granularity of ‖ΔM‖). The chunk axis lists the chunks the call touched, in order; for TTT
and EMMA token t lies in chunk ``position[t] // C − position[0] // C`` (C = the chunk length), while a family may
also count tokens that are not in the record (Titans' persistent-memory prefix) in its first chunks. The analysis (``src/analysis/plasticity.py``) and
``callbacks/plasticity.py`` read these tables and nothing family-specific: a new metric is added here first.

This module imports no torch, so the dashboard can read the metric names without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from src.errors import EngramError

if TYPE_CHECKING:
    from torch import Tensor

    from src.protocols import CapturesPlasticity

UPDATE_NORM = "update_norm"
DELTA_W_NORM = "delta_w_norm"
POSITION = "position"
REQUIRED_KEYS = (UPDATE_NORM, DELTA_W_NORM, POSITION)

# Every per-token metric of any family, [B, H, L]; the order is the column order of the analysis tables.
TOKEN_METRICS: dict[str, str] = {
    UPDATE_NORM: (
        "how strongly token t writes into the memory. TTT: ‖∇_W ℓ_t‖_F at the mini-batch start state W_n "
        "(TTT-Linear ‖k_t‖·‖g_t‖; TTT-MLP over both inner weight matrices). Titans: the momentary surprise "
        "‖∇_M ℓ_t‖_F at the chunk-start weights, over all memory layers. EMMA: ‖write_t‖ = β_t·‖key_{t−1} ⊛ value_t‖ "
        "(= β_t under renorm='write'), the increment before decay and trace renormalisation"
    ),
    # TTT
    "g_norm": "TTT: ‖g_t‖ = ‖∂ℓ_t/∂Z_t‖ at the inner model's output Z (= ‖∇_b ℓ_t‖ for TTT-Linear)",
    "k_norm": "TTT: ‖k_t‖, the inner model's input (the key after projection, conv and rotary embedding)",
    "lr": "TTT: the per-token inner learning rate ttt_base_lr · σ(a_h·x_t + c_h) / f",
    "tau": "TTT: τ_i = max(0, 1/(i+1) + learnable_token_idx[i]), i = the token's index in its mini-batch",
    # TTT and Titans: the same quantity, the family's own inner loss
    "loss_pre": (
        "ℓ_t at the chunk-start state, the loss whose gradient is the update. TTT: ½‖LN(k_t W_n + b_n) − (v_t − k_t)‖² "
        "at the mini-batch start; Titans: ‖M_{t'}(k_t) − v_t‖² at the chunk-start weights M_{t'}"
    ),
    "loss_init": "TTT: ℓ_t at the learned initial state W_0",
    "loss_post": "TTT: ℓ_t at W_{n,i}, after the token's own update (the weights its output is read with)",
    # Titans
    "surprise_past": "Titans: ‖S_t‖_F, the momentum (past surprise) after token t, Frobenius over the memory layers",
    "theta": "Titans: θ_t, the data-dependent inner step size",
    "eta": "Titans: η_t, the momentum gate (the share of past surprise S_{t−1} kept)",
    "alpha": "Titans: α_t, the forgetting gate in M_t = (1 − α_t) M_{t−1} + S_t",
    # EMMA
    "write_strength": "EMMA: β_t = write_strength · σ(gate(z*_t)), 0 where nothing can be written (padding, t = 0)",
    "write_cos": "EMMA: max_j cos(value_t, prototype_j), how close the written value is to a clean-up prototype",
    "read_cos": (
        "EMMA: cos(r_t, clean(r_t)), the raw read of M_t (unbound with query_t) against its cleaned-up read (before "
        "any oracle mix): 1 = the read is one prototype, low = noise or several superposed values. Known at every "
        "position, unlike the true prototype; not EmmaLM.read_cos, the gate's cos(raw read, true prototype)"
    ),
}

# Every per-chunk metric of any family, [B, H, M].
CHUNK_METRICS: dict[str, str] = {
    DELTA_W_NORM: (
        "‖M_end − M_start‖_F of the memory over each chunk. TTT: ‖W_{n+1} − W_n‖ over the inner weight matrices "
        "(a chunk the call leaves unfinished ends at the weights its last token was read with). Titans: over the "
        "memory layers, chunk-start to chunk-end weights. EMMA: the trace after the block's last token minus the "
        "trace before its first one"
    ),
}


def check_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``EngramError`` naming the layer, key and shape when ``records`` do not follow the schema above."""
    if not records:
        raise EngramError("plasticity records are empty: the hook must return one dict per memory layer.")
    known = {*TOKEN_METRICS, *CHUNK_METRICS, POSITION}
    first_keys = set(records[0])
    batch = length = None
    for layer, record in enumerate(records):
        missing = [key for key in REQUIRED_KEYS if key not in record]
        unknown = sorted(set(record) - known)
        if missing or unknown:
            raise EngramError(
                f"plasticity record of layer {layer}: missing required keys {missing}, unknown keys {unknown}; "
                "the keys are defined in src/models/plasticity.py (add a new metric to TOKEN_METRICS or CHUNK_METRICS)."
            )
        if set(record) != first_keys:
            raise EngramError(
                f"plasticity record of layer {layer} has keys {sorted(record)}, layer 0 {sorted(first_keys)}; "
                "every layer of one capture must record the same metrics."
            )
        for key, value in record.items():
            if getattr(value, "requires_grad", False):
                raise EngramError(f"plasticity record of layer {layer}: {key!r} is attached to the graph; detach it.")
        position = record[POSITION]
        if len(position.shape) != 1 or str(position.dtype).rpartition(".")[2] != "int64":
            raise EngramError(
                f"plasticity record of layer {layer}: 'position' has shape {tuple(position.shape)} and dtype "
                f"{position.dtype}; expected [L] int64."
            )
        shape = tuple(record[UPDATE_NORM].shape)
        if len(shape) != 3 or shape[2] != position.shape[0]:
            raise EngramError(
                f"plasticity record of layer {layer}: 'update_norm' has shape {shape}; expected [B, H, L] with "
                f"L = {position.shape[0]} positions."
            )
        if batch is not None and (shape[0], shape[2]) != (batch, length):
            raise EngramError(
                f"plasticity record of layer {layer}: 'update_norm' has shape {shape}, but layer 0 has B = {batch} "
                f"and L = {length}; all layers record the same forward."
            )
        batch, length = shape[0], shape[2]
        chunks = tuple(record[DELTA_W_NORM].shape)
        for key, value in record.items():
            got = tuple(value.shape)
            if key in TOKEN_METRICS and got != shape:
                raise EngramError(
                    f"plasticity record of layer {layer}: {key!r} has shape {got}; expected [B, H, L] = {shape} "
                    "like update_norm."
                )
            if key in CHUNK_METRICS and (len(got) != 3 or got[:2] != shape[:2] or got != chunks or got[2] < 1):
                raise EngramError(
                    f"plasticity record of layer {layer}: {key!r} has shape {got}; expected [B, H, M] with "
                    f"[B, H] = {shape[:2]} and the chunks M of delta_w_norm {chunks}."
                )


@contextmanager
def captured(model: CapturesPlasticity) -> Iterator[list[dict[str, Tensor]]]:
    """``with captured(model) as records: model(ids)``: after the block, ``records`` holds the per-layer records of
    the last forward inside it; capture is off again afterwards and the model keeps nothing."""
    records: list[dict[str, Tensor]] = []
    model.set_capture(True)
    try:
        yield records
        records.extend(model.plasticity_records())
    finally:
        model.set_capture(False)
