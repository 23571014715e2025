"""GraphQL schema assembled from every loaded module's ``schema`` (Query / Mutation / bind_signals)."""
import importlib

import graphene
from graphene_django.debug import DjangoDebug

from .openimisapps import openimis_apps

queries = []
mutations = []
for _app in openimis_apps():
    try:
        _mod = importlib.import_module(f"{_app}.schema")
    except ModuleNotFoundError as exc:
        if exc.name != f"{_app}.schema":
            raise
        continue
    if hasattr(_mod, "Query"):
        queries.append(_mod.Query)
    if getattr(_mod, "Mutation", None):
        mutations.append(_mod.Mutation)
    if hasattr(_mod, "bind_signals"):
        _mod.bind_signals()


class Query(*queries, graphene.ObjectType):
    debug = graphene.Field(DjangoDebug, name="_debug")


class Mutation(*mutations, graphene.ObjectType):
    pass


schema = graphene.Schema(query=Query, mutation=Mutation if mutations else None)
