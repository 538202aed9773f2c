"""Scheduled jobs (APScheduler) and the admin commands that run them; they import only the core."""
