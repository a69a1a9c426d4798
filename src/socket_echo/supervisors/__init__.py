"""``--workers N``: a supervisor process and its workers (processes.py), the CPU count that
``auto`` means (cpu.py), and the sum of the workers' metrics (metrics_sum.py)."""
