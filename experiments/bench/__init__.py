"""``make bench``: throughput of training, extraction, evaluation and search against the compute ceiling and the
original project's method, each measurement in its own process (see ``run.py``)."""
