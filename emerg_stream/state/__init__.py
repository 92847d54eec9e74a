"""The item-task state store: per item its side features, phase, support set and φ.

No torch and no Kafka here: the worker (``emerg_stream.stream.worker``) owns the store,
the changelog codec turns an item into an ``ItemState`` record and back.
"""

from emerg_stream.phases import COLD, COMMON, OLD, WARM_PHASES
from emerg_stream.state.dedupe import RecentIds
from emerg_stream.state.item import ItemTask, SupportRows
from emerg_stream.state.store import ItemMap, PartitionItems, StateStore

__all__ = [
    "COLD",
    "COMMON",
    "OLD",
    "WARM_PHASES",
    "ItemMap",
    "ItemTask",
    "PartitionItems",
    "RecentIds",
    "StateStore",
    "SupportRows",
]
