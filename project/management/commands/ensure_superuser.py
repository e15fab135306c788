"""Create the admin account from the environment once; leave it alone afterwards.

``docker compose up`` runs this after ``migrate`` on every start. It reads Django's own
variables for ``createsuperuser --noinput`` (DJANGO_SUPERUSER_USERNAME,
DJANGO_SUPERUSER_PASSWORD, DJANGO_SUPERUSER_EMAIL), which fails when the user exists;
this command is idempotent instead, and never resets a password changed since.
"""

import os

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

USERNAME, PASSWORD = "DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD"


class Command(BaseCommand):
    help = "Create the superuser named in DJANGO_SUPERUSER_USERNAME if it does not exist yet."

    def handle(self, *args, **options):
        username, password = os.environ.get(USERNAME, ""), os.environ.get(PASSWORD, "")
        if not username or not password:
            self.stdout.write(f"No admin account created: set {USERNAME} and {PASSWORD}.")
            return
        User = get_user_model()
        if User._default_manager.filter(**{User.USERNAME_FIELD: username}).exists():
            self.stdout.write(f"Admin account {username!r} exists; left as it is.")
            return
        # Django's own command reads the three variables, validates and creates the user.
        call_command("createsuperuser", interactive=False, verbosity=0)
        self.stdout.write(self.style.SUCCESS(f"Admin account {username!r} created."))
