"""Celery beat: the schedule as data (``schedules.beat``) and the periodic ticks."""
