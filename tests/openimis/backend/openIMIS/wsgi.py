import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "openIMIS.settings")
application = get_wsgi_application()

# gunicorn --preload imports this module in the master before forking the workers: a DB connection
# opened while the apps got ready (api_fhir_r4 reads its ModuleConfiguration) must not be shared.
from django.db import connections  # noqa: E402

connections.close_all()
