"""The dispatcher service: routes each request to a worker with a policy from `policies/`."""
