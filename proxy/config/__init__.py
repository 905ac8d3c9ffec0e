"""Configuration: :mod:`~proxy.config.model` (the frozen model, pure) and
:mod:`~proxy.config.load` (YAML, environment references, files and keys).
"""
