class ExceptionHandlerRegistry:
    """Per-module DRF exception handlers (api_fhir_r4 registers its own in AppConfig.ready)."""

    _handlers = {}

    @classmethod
    def register_exception_handler(cls, module_name, handler):
        cls._handlers[module_name] = handler

    @classmethod
    def get_exception_handler(cls, module_name):
        return cls._handlers.get(module_name)
