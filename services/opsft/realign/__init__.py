"""Recurring data realignment: one cycle (cycle.py: score -> select -> rewrite -> train ->
rescore -> report -> promote), the output-folder lock (lock.py) and the scheduler
(schedule.py). See docs/realignment.md."""
