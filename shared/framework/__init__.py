"""The gRPC server framework both services run on: serving, interceptors, errors,
settings, metrics and logs, health checks, and the checks on request fields."""
