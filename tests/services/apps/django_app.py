"""A one-file Django project: settings, views and URLs (`django-admin runserver --settings
django_app`)."""

import common
from django.http import HttpResponse
from django.urls import path

DEBUG = False
SECRET_KEY = "hunter-attach-service-test-" + "x" * 30
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "django_app"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
USE_TZ = True


def work_view(request):
    return HttpResponse(common.work_body(int(request.GET.get("n", "1"))))


def probe_view(request):
    return HttpResponse(common.probe_body())


urlpatterns = [path("work", work_view), path("probe", probe_view)]
