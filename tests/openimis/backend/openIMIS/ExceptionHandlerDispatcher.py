from rest_framework import exceptions, status
from rest_framework.views import exception_handler

from .ExceptionHandlerRegistry import ExceptionHandlerRegistry


def dispatcher(exc, context):
    """DRF EXCEPTION_HANDLER: route to the handler of the module named by the URL (/api/<module>/...)."""
    request = context.get("request")
    parts = request.path.split("/") if request is not None else []
    module = parts[2] if len(parts) > 2 else None
    handler = ExceptionHandlerRegistry.get_exception_handler(module) or exception_handler
    response = handler(exc, context)
    if response is not None and isinstance(exc, (exceptions.AuthenticationFailed, exceptions.NotAuthenticated)):
        response.status_code = status.HTTP_401_UNAUTHORIZED
    return response
