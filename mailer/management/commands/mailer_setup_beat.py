"""Create or repair mailer's periodic tasks in django-celery-beat (idempotent)."""

from django.core.management.base import BaseCommand
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from mailer.beat import install_schedule


class Command(BaseCommand):
    help = "Create or update mailer's beat schedule rows; leaves other rows alone."

    def handle(self, *args, **options):
        count = install_schedule(PeriodicTask, IntervalSchedule)
        self.stdout.write(self.style.SUCCESS(f"{count} mailer periodic tasks in place."))
