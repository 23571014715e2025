"""Celery app object some modules import; no broker runs in the test harness (ASYNC off)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "openIMIS.settings")
app = Celery("openIMIS")
app.config_from_object("django.conf:settings", namespace="CELERY")
