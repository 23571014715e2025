import importlib

from django.apps import AppConfig
from django.conf import settings


class ReceiverBindingConfig(AppConfig):
    """Imports each module's ``receivers`` so its Django signal receivers get registered."""

    name = "receiver_binding"

    def ready(self):
        for app in settings.OPENIMIS_APPS:
            try:
                importlib.import_module(f"{app}.receivers")
            except ModuleNotFoundError as exc:
                if exc.name != f"{app}.receivers":
                    raise
