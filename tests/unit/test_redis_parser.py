"""hiredis (pinned in pyproject.toml) is what parses Redis replies: the registry and prefix-index reads are
parsed in C, not by redis-py's pure-Python RESP parser (docs/performance.md)."""

from redis._parsers import _AsyncHiredisParser

from lodestar.redis_io import make_redis
from lodestar.settings import Settings


def test_redis_connections_parse_replies_with_hiredis() -> None:
    client = make_redis(Settings())
    connection = client.connection_pool.make_connection()
    assert isinstance(connection._parser, _AsyncHiredisParser)
