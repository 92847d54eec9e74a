"""The shadow method: a second checkpoint scored on the same clicks, for comparison only.

A team that runs DeepFM (or an older EmerG) today wants to see, on its own live stream,
whether EmerG beats it before switching. The worker can carry a second checkpoint, the
*shadow* (``EMERG_SHADOW_CHECKPOINT``, ``worker --shadow-checkpoint``), and run it
beside the primary under exactly the same prequential protocol:

* a new item gets the shadow's cold-start φ in the same batch as the primary's;
* every labelled click the primary scores is scored by the shadow too, with the
  shadow's φ in force *before* the click (old items with the shadow's trained params);
* the shadow's φ is warmed up at the same thresholds
  (:class:`~emerg_stream.phases.WarmupSchedule`, the shared K), on the same support rows,
  with the shadow checkpoint's own warm-up protocol.

What it writes: a second ``Prediction`` per click, marked ``shadow = true`` with the
shadow's ``method``, and the sliding-window AUC gauge labelled with it. Nothing else:
the item-params topic carries the primary's params only (rankers never see the shadow),
and the primary's params, versions and predictions are byte for byte those of a worker
without a shadow. The shadow's φ is kept in the item state (``ItemState`` v4,
``shadow_*``) with its checkpoint's ``model_version``, so it survives restarts and
rebalances like the primary's. On restore, shadow φ of another shadow checkpoint (or of
none, when the shadow was removed) is dropped: such an item, like an item announced
before the shadow was started, is not scored by the shadow (a shadow that joins late
cannot know the φ the protocol would have given it, and a cold φ in a warm phase would
make the comparison unfair). Compare the two on the clicks both scored (what
``evaluate-stream`` does).

Both checkpoints must agree on what makes the comparison one of methods and not of data:
the split's K (the thresholds), the feature columns (names, sides, kinds: the same
records feed both) and the old items (which clicks count as warm-up clicks).
:func:`check_shadow` refuses a mismatch at start with one line.
"""

from __future__ import annotations

from emerg_stream.errors import ConfigError
from emerg_stream.stream.handler import WarmupHandler

__all__ = ["PRIMARY", "SHADOW", "check_shadow"]

#: Values of the ``role`` label of the prequential AUC gauges.
PRIMARY, SHADOW = "primary", "shadow"


def check_shadow(primary: WarmupHandler, shadow: WarmupHandler) -> None:
    """Refuse a shadow checkpoint that cannot be compared with the primary on one stream.

    Raises:
        ConfigError: One line naming the first mismatch (K, feature columns, old items).
    """
    what = (
        f"shadow checkpoint ({shadow.layout.method}, {shadow.model_version}) does not fit "
        f"the primary ({primary.layout.method}, {primary.model_version})"
    )
    if shadow.k != primary.k:
        raise ConfigError(f"{what}: split K {shadow.k} != {primary.k} (the update thresholds)")
    mine, theirs = tuple(primary.fields), tuple(shadow.fields)
    if mine != theirs:
        diff = sorted({f"{f.name}/{f.side}/{f.kind}" for f in set(mine) ^ set(theirs)})
        order = "" if diff else " (same columns, other order)"
        raise ConfigError(f"{what}: feature columns differ{order}: {', '.join(diff[:6])}")
    if shadow.old_item_ids != primary.old_item_ids:
        n = len(shadow.old_item_ids ^ primary.old_item_ids)
        raise ConfigError(
            f"{what}: old item sets differ ({n} items in one only; both must be trained "
            f"on the same split)"
        )
