"""Ranks that disagree or go silent fail loudly: the setup and batch checks, the watchdog."""
