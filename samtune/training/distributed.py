"""Which process of a distributed (DDP) run this is.

Under ``trainer=ddp`` every rank runs ``train(cfg)``: Lightning's own launcher starts ranks 1..N-1 as copies
of the command (with ``LOCAL_RANK``/``NODE_RANK`` set) when ``trainer.fit`` begins; SLURM (``srun``) or
``torchrun`` start all ranks at once (``SLURM_PROCID``, ``RANK``). Only global rank 0 evaluates and writes
the report; the other ranks train and return.
"""

from __future__ import annotations

import os

from lightning.fabric.utilities.rank_zero import rank_zero_only


def is_global_zero() -> bool:
    """True in global rank 0, and in any process that is not part of a distributed run.

    Before DDP is set up the rank comes from the launcher's environment (``RANK``, ``LOCAL_RANK``,
    ``SLURM_PROCID``, read by Lightning at import, and ``NODE_RANK`` for Lightning's launcher on other
    nodes); once the Trainer has set up DDP, Lightning's global rank.
    """
    node_rank = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0 and int(node_rank) == 0
