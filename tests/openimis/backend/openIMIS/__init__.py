"""Minimal Django project hosting the openIMIS backend modules from PyPI for end-to-end tests.

The package is named ``openIMIS`` because several openIMIS modules import helpers from it
(``openIMIS.openimisapps``, ``openIMIS.ExceptionHandlerRegistry``, ``openIMIS.celery``).
"""
