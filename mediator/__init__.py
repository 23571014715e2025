"""openIMIS Mediator: a secured interoperability-layer reverse proxy for openIMIS's FHIR R4 API."""

__version__ = "0.1.0"
