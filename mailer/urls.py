"""URLs for recipients' pages; include under any prefix with namespace "mailer"."""

from django.urls import path

from . import views

app_name = "mailer"

urlpatterns = [
    path("verify/<str:token>/", views.verify_email_view, name="verify-email"),
]
