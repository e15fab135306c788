"""URLs for recipients' pages; include under any prefix with namespace "mailer"."""

from django.urls import path

from . import views

app_name = "mailer"

urlpatterns = [
    path("verify/<str:token>/", views.verify_email_view, name="verify-email"),
    path("unsubscribe/<str:token>/", views.unsubscribe_view, name="unsubscribe"),
    path("preferences/<str:token>/", views.preferences_view, name="preferences"),
    path("t/c/<str:token>/", views.click_view, name="click"),
    path("t/o/<str:token>.gif", views.open_view, name="open"),
]
