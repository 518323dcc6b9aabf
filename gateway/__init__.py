"""The OpenAI-compatible HTTP gateway onto the pipeline (`lodestar gateway`; docs/gateway.md)."""
