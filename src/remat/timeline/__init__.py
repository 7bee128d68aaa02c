"""The memory timeline of a training step, without and with a plan: a page and a snapshot.

:func:`timeline` records one step op by op (:mod:`remat.timeline.record`), draws it as one
self-contained HTML page (:mod:`remat.timeline.render`) and exports PyTorch's memory snapshot
format (:mod:`remat.timeline.snapshot`). ``remat timeline`` is its command line; see
docs/timeline.md.
"""

from remat.timeline.build import Timeline, timeline
from remat.timeline.record import StepTimeline, record_step
from remat.timeline.snapshot import save_snapshot, to_snapshot

__all__ = ["StepTimeline", "Timeline", "record_step", "save_snapshot", "timeline", "to_snapshot"]
