"""Parallelism applied from outside the single-device model.

``dims`` (sizes, coordinates, validation, process groups), ``tp`` / ``pp`` / ``ep`` (each changes or wraps a
model), ``grad`` (the gradient norm), ``shard`` (where a parameter's local tensor sits in the full one).
"""
