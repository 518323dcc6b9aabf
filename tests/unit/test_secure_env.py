"""Reading the env files `scripts/services start --secure` writes into settings."""

from __future__ import annotations

import shlex
from pathlib import Path

from app.local_services import read_env_file, settings_from_env


def test_an_env_file_round_trips_shell_quoting_and_becomes_settings(tmp_path: Path) -> None:
    ca = tmp_path / "a dir" / "ca.pem"
    values = {"LODESTAR_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:19094", "LODESTAR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
              "LODESTAR_KAFKA__SASL_USERNAME": "lodestar", "LODESTAR_KAFKA__SASL_PASSWORD": "p'w $x",
              "LODESTAR_KAFKA__SSL_CAFILE": str(ca), "LODESTAR_SERVICES_KAFKA_PLAINTEXT_BOOTSTRAP": "127.0.0.1:19092"}
    path = tmp_path / "kafka.env"
    path.write_text("# a comment\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    assert read_env_file(path) == values
    settings = settings_from_env(values, kafka={"topic_prefix": "t."})
    kafka = settings.kafka
    assert (kafka.bootstrap_servers, kafka.security_protocol, kafka.ssl_cafile) == ("127.0.0.1:19094", "SASL_SSL", ca)
    assert kafka.sasl_password.get_secret_value() == "p'w $x" and kafka.topic_prefix == "t."
