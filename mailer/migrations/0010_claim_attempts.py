"""When a claimed message was tried, so a dead worker's untried claims go back untouched;
beat's recovery and release once per queue (see mailer.beat)."""

from django.db import migrations, models


def install(apps, schema_editor):
    from mailer.beat import install_schedule

    install_schedule(
        apps.get_model("django_celery_beat", "PeriodicTask"),
        apps.get_model("django_celery_beat", "IntervalSchedule"),
    )


def count_claims_as_tried(apps, schema_editor):
    # Claims made before this migration counted their attempt at claim time: treat them
    # as tried, so recovery applies STUCK_POLICY to them as it did before.
    apps.get_model("mailer", "Message").objects.filter(status="sending").update(
        attempted_at=models.F("claimed_at")
    )


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0009_report_event_index"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="attempted_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(count_claims_as_tried, migrations.RunPython.noop),
        migrations.RunPython(install, migrations.RunPython.noop),
    ]
