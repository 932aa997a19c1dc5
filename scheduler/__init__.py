"""Fleet-level processes that are not on any GPU: the janitor (reclaims work of dead workers)."""
