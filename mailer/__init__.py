"""mailer: every email a Django product sends, through Celery."""
