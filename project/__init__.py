"""Host project for the mailer app; loads the Celery app with Django."""

from .celery import app as celery_app

__all__ = ("celery_app",)
