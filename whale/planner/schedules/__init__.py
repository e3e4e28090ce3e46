"""Pipeline schedules: generators, the simulator that predicts a step, and its fast flow-shop form."""
