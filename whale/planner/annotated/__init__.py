"""Plans from what the user wrote: replicas, stages and splits of the annotations."""
