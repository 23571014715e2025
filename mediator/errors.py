"""One error hierarchy for the mediator: every error of its own derives from MediatorError (structured
fields, one log()); private control-flow exceptions caught where they are raised are the only others.

An error that ends a request says how, as data: `decision()` is the Decision (reason code, status,
message safe to show the caller, headers) the request ends with. The request chain turns any
MediatorError raised by a stage or a step into its decision in one place (`mediator.chain`); anything
else is `mediator.internal_error`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from mediator.decision import Decision
from mediator.logs import JsonEvent


class MediatorError(Exception):
    """Base of the mediator's own errors."""

    reason: str = "mediator.internal_error"
    """Stable reason code `<stage>.<snake_case>` of the request this error ends."""
    status: int = 500
    public_message: str = "internal error"
    """What the caller is told (never the exception text: it may name openIMIS's internals)."""
    log_level: ClassVar[int] = logging.ERROR
    """How `log()` logs it (with the exception text; errors that end a request as expected say less)."""
    close_connection: ClassVar[bool] = False
    """True: the connection is closed after the answer (the request was not read to its end)."""

    def decision(self) -> Decision:
        return Decision.denied(self.reason, self.status, self.public_message)

    def log(self, logger: logging.Logger) -> None:
        logger.log(self.log_level, JsonEvent.of("request.error", reason=self.reason, error=type(self).__name__,
                                                detail=str(self)))


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
