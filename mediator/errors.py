"""One error hierarchy for the mediator: every error carries structured fields and one log()."""

from __future__ import annotations

import logging
from dataclasses import dataclass


class MediatorError(Exception):
    """Base of the mediator's own errors."""

    def log(self, logger: logging.Logger) -> None:
        logger.error("%s: %s", type(self).__name__, self)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in one configuration file, at a line and column (1-based)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(MediatorError):
    """The configuration was refused; `problems` says where and why."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
