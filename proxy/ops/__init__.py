"""Operations: the admin listener (health, readiness, metrics, reload, token
status) and the supervisor that runs and restarts workers.
"""
