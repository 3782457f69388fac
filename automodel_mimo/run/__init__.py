"""A run's life around the training itself: the output_dir lock (lock.py), the record of what ran (record.py),
a quiet terminal (quiet.py) and deliberate crashes for tests (faults.py)."""
