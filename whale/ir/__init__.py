"""The frozen objects that cross stages: the Plan, rows per replica, pipeline schedules as data,
and the cluster/device description. A leaf: it imports no other part of whale."""
