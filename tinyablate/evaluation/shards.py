"""The one step every evaluation shares: each rank scores its share of the problems, all ranks get all records.

    records = score_across_ranks(model, problems, lambda mine: [...one record per problem of `mine`...])

Used by `generation.evaluate` and `choice.evaluate_choices`. On a single process the share is every
problem. Under several ranks (distributed.py) the problems are split round robin, each rank scores its
own with the model in eval mode, and the records are gathered back in the problems' order, so every rank
returns the same records and each problem is scored exactly once.
"""

from __future__ import annotations

from typing import Callable

from .. import distributed


def score_across_ranks(model, problems: list, score: Callable[[list], list]) -> list:
    """`score(share)` on this rank's share (model in eval mode, its mode restored after), gathered from
    every rank in the order of `problems`; each record's "id" must be its problem's."""
    mine = distributed.shard(problems, distributed.current())  # all of them on a single rank
    was_training = model.training
    model.eval()
    scored = score(mine)
    model.train(was_training)
    records = distributed.unshard(distributed.gather_to_all(scored))
    if [r["id"] for r in records] != [p.id for p in problems]:
        raise RuntimeError(f"evaluation scored {len(records)} records for {len(problems)} problems")
    return records
