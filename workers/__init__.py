"""Scheduled jobs (APScheduler); they arrive with the jobs issue and import only the core."""
