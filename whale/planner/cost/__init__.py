"""The cost model: per-layer profiles of a captured model, roofline and alpha-beta formulas, step-time and memory prediction."""
