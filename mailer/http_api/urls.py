"""The HTTP API's URLs: ``path("api/v1/", include("mailer.http_api.urls"))``."""

from django.urls import path
from drf_spectacular.views import SpectacularJSONAPIView

from . import views

app_name = "mailer_api"

#: drf-spectacular's settings for this API's document (the host's own settings untouched).
SCHEMA_SETTINGS = {
    "TITLE": "mailer HTTP API",
    "DESCRIPTION": "Transactional sending, message status and suppressions. Errors are "
    "RFC 9457 problem details (application/problem+json).",
    "VERSION": "1",
    "OAS_VERSION": "3.1.0",
    "COMPONENT_SPLIT_REQUEST": True,
}

urlpatterns = [
    path("messages", views.MessagesView.as_view(), name="messages"),
    path("messages/batch", views.BatchView.as_view(), name="batch"),
    path("messages/<str:message_id>", views.MessageView.as_view(), name="message"),
    path(
        "contacts/<str:email>/suppressions",
        views.SuppressionsView.as_view(),
        name="suppressions",
    ),
    path(
        "openapi.json",
        SpectacularJSONAPIView.as_view(custom_settings=SCHEMA_SETTINGS),
        name="openapi",
    ),
]
