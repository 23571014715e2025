"""URLs: GraphQL at /api/graphql, each openIMIS module's urls under /api/<module>/ (SITE_ROOT=api)."""
import importlib

from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from graphql_jwt.decorators import jwt_cookie

from .openimisapps import openimis_apps
from .settings import SITE_ROOT
from .views import GraphQLView


def _module_urls():
    patterns = []
    for module in openimis_apps():
        try:
            importlib.import_module(f"{module}.urls")
        except ModuleNotFoundError as exc:
            if exc.name != f"{module}.urls":
                raise
            continue
        patterns.append(path(f"{SITE_ROOT()}{module}/", include(f"{module}.urls")))
    return patterns


urlpatterns = [
    path(f"{SITE_ROOT()}graphql", jwt_cookie(csrf_exempt(GraphQLView.as_view(graphiql=False)))),
    path("ht/", include("health_check.urls")),
] + _module_urls()
