"""A Claim row per batch a worker holds (its lease and progress); beat's recovery and
release once per queue (see mailer.beat)."""

import django.utils.timezone
from django.db import migrations, models

from mailer.beat import install_schedule


def install(apps, schema_editor):
    install_schedule(
        apps.get_model("django_celery_beat", "PeriodicTask"),
        apps.get_model("django_celery_beat", "IntervalSchedule"),
    )


class Migration(migrations.Migration):

    dependencies = [
        ('mailer', '0009_report_event_index'),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [
        migrations.CreateModel(
            name='Claim',
            fields=[
                ('token', models.UUIDField(editable=False, primary_key=True, serialize=False)),
                ('queue', models.CharField(choices=[('transactional', 'Transactional'), ('campaign', 'Campaign')], max_length=20)),
                ('tried_through', models.BigIntegerField(blank=True, null=True)),
                ('sent_through', models.BigIntegerField(blank=True, null=True)),
                ('renewed_at', models.DateTimeField(db_index=True)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
        ),
        migrations.RunPython(install, migrations.RunPython.noop),
    ]
