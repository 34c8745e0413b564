"""`fastlm serve` flag errors: one line on stderr, exit code 2, before any model loads."""
import socket

import pytest

from fastlm.cli import main
from fastlm.serve.commands import parse_bytes


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "port must be in [0, 65535]"),
    (["--kv-cache-memory", "lots"], "kv_cache_memory must be a size like 512M"),
    (["--kv-cache-memory=-1G"], "kv_cache_memory must be > 0"),
    (["--max-waiting-requests", "-1"], "max_waiting_requests must be >= 0"),
    (["--chat-template", "/no/such/template.jinja"], "chat template file not found"),
    (["--model", "/no/such/checkpoint"], "model path does not exist"),
    (["--api-key", ""], "api_key must not be empty"),
])
def test_bad_flags_exit_2_with_one_line(capsys, flags, message):
    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("fastlm serve: error:")


def test_a_taken_port_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", "--port", str(taken.getsockname()[1]), "--model", "/no/such/checkpoint"]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("1048576", 1 << 20), ("512M", 512 << 20), ("4G", 4 << 30),
                                            ("1.5GiB", 3 << 29), ("384k", 384 << 10), ("2gb", 2 << 30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
