"""`python -m client` argument handling and output, with a fake client (no server)."""

from __future__ import annotations

import asyncio
import io

import pytest

from client import __main__ as cli
from client.core import Caption, CaptionError


class FakeClient:
    """AsyncCaptionClient's surface used by the CLI; fails images whose name contains 'bad'."""

    instances: list[FakeClient] = []

    def __init__(self, url, model, *, concurrency, timeout, attempt_timeout, retry, tls):
        self.settings = dict(
            url=url,
            model=model,
            concurrency=concurrency,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            attempts=retry.max_attempts,
        )
        self.tls = tls
        self.requests = []
        FakeClient.instances.append(self)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass

    async def caption_iter(self, images, **decode):
        self.requests.append((list(images), decode))
        for i, name in enumerate(images):
            await asyncio.sleep(0)
            if "bad" in name:
                yield Caption(image=name, error=CaptionError(name, "rejected by the server: not an image"))
            else:
                yield Caption(
                    image=name,
                    caption=f"a red circle {i}",
                    score=-1.25 * i,
                    attempts=1 + ("retry" in name),
                    model_version=None if "old" in name else f"{i + 1}:0123abcd",
                )

    def stats(self):
        return [
            {"url": u, "sent": 3, "ok": 2, "failed": 1, "set_aside": 1, "up": False, "last_error": "Socket closed"}
            for u in self.settings["url"].split(",")
        ]


@pytest.fixture(autouse=True)
def _reset():
    FakeClient.instances.clear()
    yield


def run_cli(argv):
    args = cli.build_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(cli.run(args, out=out, err=err, client_factory=FakeClient))
    return code, out.getvalue(), err.getvalue()


def make_tree(tmp_path, names):
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_prints_path_tab_caption_in_sorted_order(tmp_path):
    make_tree(tmp_path, ["b.png", "a.jpg", "sub/c.png", "readme.txt"])
    code, out, err = run_cli([str(tmp_path)])
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{tmp_path}/a.jpg\ta red circle 0",
        f"{tmp_path}/b.png\ta red circle 1",
        f"{tmp_path}/sub/c.png\ta red circle 2",
    ]


def test_failures_go_to_stderr_others_still_printed_exit_1(tmp_path):
    make_tree(tmp_path, ["1.png", "2_bad.png", "3.png"])
    code, out, err = run_cli([str(tmp_path), "--scores"])
    assert code == 1
    assert out.splitlines() == [f"{tmp_path}/1.png\ta red circle 0\t-0.0000", f"{tmp_path}/3.png\ta red circle 2\t-2.5000"]
    assert f"{tmp_path}/2_bad.png: rejected by the server: not an image" in err
    assert "1 of 3 images failed" in err


def test_show_version_adds_the_model_that_answered(tmp_path):
    make_tree(tmp_path, ["1.png", "2_old.png"])
    code, out, _ = run_cli([str(tmp_path), "--scores", "--show-version"])
    assert code == 0
    assert out.splitlines() == [
        f"{tmp_path}/1.png\ta red circle 0\t-0.0000\t1:0123abcd",
        f"{tmp_path}/2_old.png\ta red circle 1\t-1.2500\t-",
    ]


def test_flags_reach_the_client(tmp_path):
    make_tree(tmp_path, ["x.png"])
    code, _, _ = run_cli(
        [
            str(tmp_path / "x.png"),
            "--url",
            "h:1",
            "--beam",
            "4",
            "--concurrency",
            "2",
            "--timeout",
            "3.5",
            "--max-length",
            "12",
            "--retries",
            "2",
            "--model-name",
            "m",
            "--attempt-timeout",
            "1.5",
        ]
    )
    assert code == 0
    (c,) = FakeClient.instances
    assert c.settings == dict(url="h:1", model="m", concurrency=2, timeout=3.5, attempt_timeout=1.5, attempts=2)
    assert c.requests == [([str(tmp_path / "x.png")], dict(beam_size=4, max_length=12, temperature=None))]


def test_environment_supplies_defaults(monkeypatch):
    monkeypatch.setenv("CAPTIONER_URL", "envhost:9")
    monkeypatch.setenv("CAPTIONER_BEAM", "5")
    monkeypatch.setenv("CAPTIONER_CONCURRENCY", "16")
    monkeypatch.setenv("CAPTIONER_TIMEOUT", "2")
    args = cli.build_parser().parse_args(["img.png"])
    assert (args.url, args.beam, args.concurrency, args.timeout) == ("envhost:9", 5, 16, 2.0)
    args = cli.build_parser().parse_args(["img.png", "--beam", "1"])
    assert args.beam == 1  # the flag wins over the environment


def test_defaults_without_environment(monkeypatch):
    for var in ["CAPTIONER_URL", "CAPTIONER_BEAM", "CAPTIONER_CONCURRENCY", "CAPTIONER_TIMEOUT"]:
        monkeypatch.delenv(var, raising=False)
    args = cli.build_parser().parse_args(["img.png"])
    assert (args.url, args.beam, args.concurrency, args.timeout) == ("localhost:8001", None, 8, 30.0)


def test_empty_directory_is_a_usage_error(tmp_path):
    code, out, err = run_cli([str(tmp_path)])
    assert code == 2 and out == "" and "no images found" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["a.png", "--concurrency", "0"],
        ["a.png", "--timeout", "0"],
        ["a.png", "--attempt-timeout", "0"],
        ["a.png", "--beam", "two"],
    ],
)
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_several_endpoints_and_stats(tmp_path):
    make_tree(tmp_path, ["a.png", "b_retry.png"])
    code, out, err = run_cli([str(tmp_path), "--url", "h1:8001,h2:8001", "--stats"])
    assert code == 0 and len(out.splitlines()) == 2
    assert FakeClient.instances[0].settings["url"] == "h1:8001,h2:8001"
    assert "stats: 2 of 2 images captioned, 1 needed more than one attempt" in err
    assert ("stats: h2:8001: 3 attempts, 2 ok, 1 failed, set aside 1 times, set aside now; last error: Socket closed") in err


@pytest.mark.parametrize("url", ["h1:8001,,h2:8001", "h1", "h1:8001,h2"])
def test_bad_endpoint_list_exits_2(url, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["a.png", "--url", url])
    assert e.value.code == 2 and "host:port" in capsys.readouterr().err


def test_tls_flags_and_environment_reach_the_client(tmp_path, monkeypatch):
    from client.core import TLSConfig

    make_tree(tmp_path, ["x.png", "ca.pem", "c.pem", "c.key"])
    assert run_cli([str(tmp_path / "x.png")])[0] == 0
    assert FakeClient.instances[-1].tls is None  # plaintext by default
    monkeypatch.setenv("CAPTIONER_TLS_ROOT_CERT", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("CAPTIONER_TLS_CLIENT_CERT", str(tmp_path / "c.pem"))
    code, _, _ = run_cli([str(tmp_path / "x.png"), "--tls-client-key", str(tmp_path / "c.key")])
    assert code == 0
    assert FakeClient.instances[-1].tls == TLSConfig(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    monkeypatch.delenv("CAPTIONER_TLS_ROOT_CERT")
    monkeypatch.delenv("CAPTIONER_TLS_CLIENT_CERT")
    monkeypatch.setenv("CAPTIONER_TLS", "true")
    run_cli([str(tmp_path / "x.png")])
    assert FakeClient.instances[-1].tls == TLSConfig()  # TLS with the system's roots


@pytest.mark.parametrize("argv", [["a.png", "--tls-client-cert", "c.pem"], ["a.png", "--tls-root-cert", "/nope.pem"]])
def test_unusable_tls_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "TLS" in capsys.readouterr().err


def test_health_subcommand_unless_a_path_named_health_exists(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.health, "main", lambda argv, prog: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["health", "--url", "h:1", "--timeout", "2"]) == 0
    assert calls == [["--url", "h:1", "--timeout", "2"]]
    (tmp_path / "health").mkdir()
    assert not cli.is_health_command(["health"])  # an existing folder named health is captioned, as before
    assert not cli.is_health_command(["pics", "health"]) and not cli.is_health_command([])
    make_tree(tmp_path, ["health/a.png"])
    args = cli.build_parser().parse_args(["health"])
    out, err = io.StringIO(), io.StringIO()
    assert asyncio.run(cli.run(args, out=out, err=err, client_factory=FakeClient)) == 0
    assert out.getvalue() == "health/a.png\ta red circle 0\n"
