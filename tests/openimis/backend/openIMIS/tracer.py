class TracerMiddleware:
    """Graphene middleware placeholder (upstream traces with Sentry; not used here)."""

    def resolve(self, next, root, info, **kwargs):
        return next(root, info, **kwargs)
