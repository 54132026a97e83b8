"""Sessions on disk (plan under edit, journal, score caches, jobs, evaluations). No UI imports allowed here.

Nothing has landed yet: see the sessions issue. The package exists so the import contracts cover it from day one.
"""
