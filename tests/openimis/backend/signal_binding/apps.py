import importlib
import logging

from django.apps import AppConfig
from django.conf import settings

logger = logging.getLogger(__name__)


class SignalBindingConfig(AppConfig):
    """Connects each module's service signals (``<module>.signals.bind_service_signals``); must load last."""

    name = "signal_binding"

    def ready(self):
        for app in settings.OPENIMIS_APPS:
            try:
                mod = importlib.import_module(f"{app}.signals")
            except ModuleNotFoundError as exc:
                if exc.name != f"{app}.signals":
                    logger.warning("%s.signals failed to import: %s", app, exc)
                continue
            except Exception as exc:  # a broken optional module must not stop the server
                logger.warning("%s.signals failed to import: %s", app, exc)
                continue
            binder = getattr(mod, "bind_service_signals", None)
            if binder is None:
                continue
            try:
                binder()
            except Exception as exc:
                logger.warning("%s: bind_service_signals failed: %s", app, exc)
