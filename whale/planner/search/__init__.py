"""Search: the plan space, balancing rows and layers, pins, the search itself and its report."""
