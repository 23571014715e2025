from django.apps import apps
from graphene_django.views import GraphQLView as BaseGraphQLView


class GraphQLView(BaseGraphQLView):
    """GraphQL endpoint whose context (the request) carries the modules' per-request dataloaders."""

    def get_context(self, request):
        dataloaders = {}
        for app in apps.get_app_configs():
            if hasattr(app, "set_dataloaders"):
                app.set_dataloaders(dataloaders)
        request.dataloaders = dataloaders
        return request
