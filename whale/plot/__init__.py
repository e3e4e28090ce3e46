"""Pictures of plans and steps (needs matplotlib: ``pip install 'whale[plot]'``).

* :func:`draw_plan`: the cluster by node, what each device runs and how full its memory is.
* :func:`draw_timelines`: simulated and measured pipeline steps as Gantt charts on one time axis.

Example::

    from whale.plot import draw_plan, draw_timelines

    draw_plan("plan.png", plan, cluster, report)
    draw_timelines("step.png", simulated, program.timeline())
"""

from .plan_picture import PictureInfo, draw_plan
from .timeline_picture import TimelinePicture, draw_timelines

__all__ = ["PictureInfo", "TimelinePicture", "draw_plan", "draw_timelines"]
