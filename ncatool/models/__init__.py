"""NCA models: the core automaton and task wrappers."""
