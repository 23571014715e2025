"""Store-and-forward claim submission (README "Queued claims"): FHIR asynchronous requests on Redis Streams."""

from mediator.async_claims.service import AsyncClaims
from mediator.async_claims.status import make_status_handler

__all__ = ["AsyncClaims", "make_status_handler"]
