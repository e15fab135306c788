from django.db import migrations

from mailer.beat import install_schedule


def install(apps, schema_editor):
    install_schedule(
        apps.get_model("django_celery_beat", "PeriodicTask"),
        apps.get_model("django_celery_beat", "IntervalSchedule"),
    )


class Migration(migrations.Migration):
    dependencies = [("mailer", "0004_campaigns")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
