"""Background work: the expiry listener, the rq jobs (sweeper, reconciler) and their scheduler."""
