"""Deployment files (Dockerfile, Kubernetes, systemd): their flags are the CLI's, their ports,
probes and timeouts agree with each other, and what they run works on this machine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from conftest import exchange, http_status, metrics_port

from socket_echo.binds import parse_metrics_address
from socket_echo.cli import cli
from socket_echo.config import CLOSE_WAIT

ROOT = Path(__file__).resolve().parent.parent
# The image's build and run know no SOCKET_ECHO_NO_EXTENSIONS: these tests build and serve
# as it does even when the suite itself runs with the extensions off.
IMAGE_BUILD = {"SOCKET_ECHO_NO_EXTENSIONS": ""}
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
PY = [sys.executable, "-m", "socket_echo"]


def parse(command: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The parameters the real CLI makes of these arguments (and SOCKET_ECHO_* variables)."""
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        sub = cli.commands[command]
        return dict(sub.make_context(command, list(args)).params)
    except click.ClickException as exc:  # the assertion names the flag
        raise AssertionError(f"{command} {args}: {exc.format_message()}") from None
    finally:
        os.environ.clear()
        os.environ.update(old)


# -- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments (continuation lines joined), in order."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def docker_env(instructions: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in instructions["ENV"]:
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def healthcheck(instructions: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    """The HEALTHCHECK command as the shell inside the image would run it."""
    command = instructions["HEALTHCHECK"][-1].split(" CMD ", 1)[1]
    if command.startswith("["):
        return list(json.loads(command))
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], command))


def test_dockerfile_runs_non_root_exposes_tcp_and_udp_and_binds_all_addresses():
    d = dockerfile()
    final_stage = d["USER"][-1]
    assert final_stage.split(":")[0] not in ("root", "0")
    env = docker_env(d)
    params = parse("serve", [], env)  # the ENTRYPOINT is `socket-echo serve` plus these
    assert json.loads(d["ENTRYPOINT"][-1]) == ["socket-echo", "serve"]
    assert params["host"] == ("::",)
    exposed = set(" ".join(d["EXPOSE"]).split())
    metrics_port = parse_metrics_address(params["metrics"]).port
    assert {f"{params['port']}/tcp", f"{params['port']}/udp", f"{metrics_port}/tcp"} <= exposed
    health = healthcheck(d, env)
    assert health[:3] == ["socket-echo", "probe", "--quick"]
    probe = parse("probe", health[2:])
    assert probe["target"].endswith(f":{params['port']}")


def test_dockerfile_command_and_healthcheck_work_here(start_server):
    """The image's server (its environment, on loopback and a free port) and its HEALTHCHECK."""
    d = dockerfile()
    env = {
        **docker_env(d),
        "SOCKET_ECHO_HOST": "127.0.0.1",
        "SOCKET_ECHO_PORT": "0",
        "SOCKET_ECHO_METRICS": "127.0.0.1:0",
    }
    server = start_server(host="", env=env)
    assert '"level":"info"' in server.lines[0]  # the image's JSON logs
    health = healthcheck(d, {**env, "SOCKET_ECHO_PORT": str(server.port)})
    result = subprocess.run([*PY, *health[1:]], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    server.signal(signal.SIGTERM)  # docker stop
    assert server.wait(30) == 0


@pytest.mark.packaging  # a gate of its own in make test: wheels compiled, not a behaviour
def test_dockerfile_build_steps_make_a_working_install(start_server, tmp_path):
    """No Docker engine here: run the Dockerfile's own pip steps in a fresh virtual
    environment instead (wheels of the package and its dependencies, then an install from
    them alone), and serve from that install: a non-editable install is what the image has."""
    d = dockerfile()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheels = tmp_path / "wheels"
    steps = [p.strip() for run in d["RUN"] for p in run.split("&&") if p.strip().startswith("pip ")]
    assert [s.split()[:2] for s in steps] == [["pip", "wheel"], ["pip", "install"]]
    for step in steps:
        argv: list[str] = []
        for word in shlex.split(step.replace("/wheels", str(wheels))):
            argv += sorted(map(str, wheels.glob("*.whl"))) if word.endswith("*.whl") else [word]
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-m", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **IMAGE_BUILD},
        )
        assert result.returncode == 0, result.stderr[-2000:]
    installed = venv / "bin" / "socket-echo"
    env = {
        **docker_env(d),
        **IMAGE_BUILD,
        "SOCKET_ECHO_HOST": "127.0.0.1",
        "SOCKET_ECHO_PORT": "0",
        "SOCKET_ECHO_METRICS": "127.0.0.1:0",
    }
    server = start_server(host="", env=env, launcher=[str(installed)])
    # the wheel carries the compiled extensions: the image serves on the native paths
    server.wait_for_log(r"TCP echo server listening on .*; native path\)")
    server.wait_for_log(r"UDP echo server listening on .*; native path\)")
    health = healthcheck(d, {**env, "SOCKET_ECHO_PORT": str(server.port)})
    result = subprocess.run([str(installed), *health[1:]], capture_output=True, timeout=30)
    assert result.returncode == 0, result
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0


# -- Kubernetes -----------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def flag_args(args: list[str]) -> list[str]:
    return [part for a in args for part in (a.split("=", 1) if a.startswith("--") else [a])]


def test_kubernetes_manifests_agree_with_the_cli_and_each_other():
    m = manifests()
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(m)
    assert set(m["Kustomization"]["resources"]) == {  # the bench Job is applied on its own
        p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", BENCH_JOB)
    }
    deploy = m["Deployment"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    params = parse("serve", flag_args(container["args"]))
    assert params["host"] == ("::",)
    ports = {p["name"]: p for p in container["ports"]}
    assert (ports["echo-tcp"]["containerPort"], ports["echo-tcp"]["protocol"]) == (
        params["port"],
        "TCP",
    )
    assert (ports["echo-udp"]["containerPort"], ports["echo-udp"]["protocol"]) == (
        params["port"],
        "UDP",
    )
    assert ports["metrics"]["containerPort"] == parse_metrics_address(params["metrics"]).port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]["containerPort"]
    # Shutdown: preStop pause, then SIGTERM, then the drain; all inside the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + params["graceful_timeout"] + CLOSE_WAIT
    assert pod["spec"]["terminationGracePeriodSeconds"] >= budget + 2
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilization needs it

    service = m["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    by_proto = {p["protocol"]: p for p in service["spec"]["ports"]}
    assert set(by_proto) == {"TCP", "UDP"}
    for proto, port in by_proto.items():
        assert ports[port["targetPort"]]["protocol"] == proto
    pdb = m["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"]
    hpa = m["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


BENCH_JOB = "bench-job.yaml"


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_kubernetes_manifests_are_valid_against_kubernetes_schemas(path):
    """Offline, strict (an unknown field fails): kubernetes-validate's copy of the schemas."""
    import kubernetes_validate

    for doc in yaml.safe_load_all((K8S / path).read_text()):
        if doc and doc["kind"] != "Kustomization":
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_bench_job_runs_one_segment_per_index_on_nodes_of_their_own():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / BENCH_JOB).read_text())}
    job, claim = docs["Job"], docs["PersistentVolumeClaim"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["socket-echo", "bench"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SEGMENT"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # Kubernetes expands $(VAR) in args from env: do it as it does, for every index
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
    for index in range(spec["completions"]):
        values = {"$(SEGMENT)": str(index), "$(START_AT)": start}
        args = [
            re.sub(r"\$\(\w+\)", lambda m, v=values: v[m.group(0)], a)  # type: ignore[misc]
            for a in container["args"]
        ]
        params = parse("bench", flag_args(args))
        assert params["segment"] == (index, spec["parallelism"])  # N = parallelism = completions
        assert params["segment"][1] == spec["completions"]
        assert params["start_at"] == pytest.approx(time.time() + 120, abs=5)
        assert params["json_file"] == f"/results/segment-{index}.json"
    assert "REPLACE-WITH-START-TIME" in env["START_AT"]["value"]  # docs/distributed-bench.md
    (mount,) = container["volumeMounts"]
    assert params["json_file"].startswith(mount["mountPath"] + "/")
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    labels = spec["template"]["metadata"]["labels"]
    assert anti[0]["labelSelector"]["matchLabels"].items() <= labels.items()
    server = manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = manifests()["Service"]
    host, port = args[0].removeprefix("tcp://").split(":")
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    avoid = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert avoid[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= server.items()


def test_kubernetes_container_answers_its_probes_and_turns_unready_on_sigterm(start_server):
    (container,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = flag_args(container["args"])
    args[args.index("--host") + 1] = "127.0.0.1"  # loopback and free ports here
    args[args.index("--port") + 1] = "0"
    args[args.index("--metrics") + 1] = "127.0.0.1:0"
    args[args.index("--graceful-timeout") + 1] = "5"
    server = start_server(*args)
    mport = metrics_port(server)
    ready = container["readinessProbe"]["httpGet"]["path"]
    live = container["livenessProbe"]["httpGet"]["path"]
    assert http_status(mport, ready) == 200
    assert http_status(mport, live) == 200
    held = server.connect()
    assert exchange(held, b"open") == b"open"  # accepted (not only in the backlog) by SIGTERM
    server.signal(signal.SIGTERM)  # what Kubernetes sends after preStop
    deadline = time.monotonic() + 10
    while http_status(mport, ready) != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http_status(mport, live) == 200  # alive while it drains: no restart
    held.close()
    assert server.wait(30) == 0


# -- systemd -------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_start() -> list[str]:
    return shlex.split(unit(SYSTEMD / "socket-echo.service")["ExecStart"][0])


def test_systemd_units_agree_with_the_cli_and_sandbox_the_service():
    service, sock = unit(SYSTEMD / "socket-echo.service"), unit(SYSTEMD / "socket-echo.socket")
    argv = exec_start()
    assert argv[0].endswith("/socket-echo") and argv[1] == "serve"
    params = parse("serve", argv[2:])
    listen = sock.get("ListenStream", []) + sock.get("ListenDatagram", [])
    assert list(params["fds"]) == list(range(3, 3 + len(listen)))  # systemd's order
    assert sock["ListenStream"] == sock["ListenDatagram"]  # TCP and UDP on one port
    assert float(service["TimeoutStopSec"][0]) > params["graceful_timeout"] + CLOSE_WAIT
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "KillMode": "mixed",
    }.items():
        assert service[key] == [value], key
    assert "socket-echo.socket" in service["Requires"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify(tmp_path):
    binary = shutil.which("socket-echo") or str(Path(sys.executable).parent / "socket-echo")
    for name in ("socket-echo.service", "socket-echo.socket"):
        text = (SYSTEMD / name).read_text().replace(exec_start()[0], binary)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "socket-echo.socket"),
            str(tmp_path / "socket-echo.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert "socket-echo" not in output, output  # no warning about our units


def test_systemd_socket_activation_as_the_units_describe_it(start_server):
    """Sockets made as socket-echo.socket says, passed as descriptors 3 and 4 to ExecStart."""
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for s in (tcp, udp):  # BindIPv6Only=both, but on ::1 (loopback only here)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.bind(("::1", 0))
    tcp.listen(16)
    udp.bind(("::1", tcp.getsockname()[1]))
    argv = exec_start()
    args = argv[2:]
    args[args.index("--workers") + 1] = "2"
    args[args.index("--metrics") + 1] = "127.0.0.1:0"
    # Put the sockets on 3 and 4, as systemd does, then exec the unit's command line.
    shim = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.execv(sys.executable, [sys.executable, '-m', 'socket_echo', *sys.argv[3:]])"
    )
    launcher = [sys.executable, "-c", shim, str(tcp.fileno()), str(udp.fileno())]
    server = start_server(
        *args,
        host="",
        launcher=launcher,
        pass_fds=(tcp.fileno(), udp.fileno()),
        expect_listeners=4,  # TCP and UDP in each of the two workers
    )
    port = tcp.getsockname()[1]
    tcp.close()
    udp.close()
    assert {entry[2] for entry in server.listeners} == {port}
    with server.connect("::1") as c:
        assert exchange(c, b"activated") == b"activated"
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as d:
        d.settimeout(5)
        d.sendto(b"datagram", ("::1", port))
        assert d.recvfrom(100)[0] == b"datagram"
    server.signal(signal.SIGTERM)  # systemctl stop
    assert server.wait(30) == 0


def test_without_a_compiler_the_build_succeeds_in_one_line_and_the_pure_paths_serve(
    start_server, tmp_path
):
    """The extensions are optional: with a C compiler that fails, the build still succeeds,
    says so in one line, and the server runs its pure-Python paths."""
    import shutil as sh

    copy = tmp_path / "src-copy"
    copy.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        sh.copy(ROOT / name, copy / name)
    sh.copytree(ROOT / "src", copy / "src", ignore=sh.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **IMAGE_BUILD, "CC": "/bin/false"},
    )
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the pure-Python data paths will run" in lines[0], lines
    assert not list((copy / "src").rglob("*.so"))
    server = start_server(expect_listeners=2, env={"PYTHONPATH": str(copy / "src")})
    server.wait_for_log(r"TCP echo server listening on .*; epoll path\)")
    server.wait_for_log(r"UDP echo server listening on .*; mmsg path\)")
