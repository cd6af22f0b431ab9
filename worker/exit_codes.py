"""The worker's exit codes: what a pool manager or an orchestrator reads when the process ends."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CONFIG = 2  # a bad setting, a backend this build lacks, a port that cannot be bound
    MODEL = 3  # the model could not be resolved, converted or loaded
    CALLBACK = 4  # the pool manager never took the ready callback
    SIGNAL_BASE = 128  # a second SIGTERM/SIGINT exits at once with 128 + its number (143, 130)
