"""Tasks: one class per kind of problem, registered by name (registry.py), owning everything tuneforge knows
about it (base.py says what). tuneforge's own tasks register when tuneforge is imported (builtin.py)."""
