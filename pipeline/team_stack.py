"""A team's shared services on one machine, from existing engines: PostgreSQL as MLflow's backend store,
`mlflow server --serve-artifacts` in front of it, and a DVC remote.

    scripts/team-stack start [--dir DIR] [--port 5000] [--pg-port 5433]
    scripts/team-stack status|stop [--dir DIR]

scripts/team-stack runs it from the project root, whose DVC remote it sets. Everything lives in DIR (default
.team-stack/ in the project): the PostgreSQL cluster (postgres/, created with its database on the first start),
MLflow's artifacts (artifacts/), the DVC remote (dvc-remote/, standing for the team's shared storage), the logs,
and stack.json (what start launched). start is idempotent; stop leaves nothing running and keeps the data.
"""
from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline import fsio, paths
from pipeline.cli import run
from pipeline.errors import UserError

USER = DATABASE = "mlflow"  # the cluster's one role (its superuser) and MLflow's database
REMOTE = "team"  # the DVC remote's name
# PostgreSQL refuses to run as root: as root, the cluster is owned and run by Debian's `postgres` user.
CLUSTER_OWNER = "postgres"
# The first start on an empty database creates MLflow's schema (~35 s here while other jobs ran).
SERVER_START_SECONDS = 240
STOP_SECONDS = 30


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL (/usr/lib/postgresql/<major>/bin), else pg_ctl's directory on PATH."""
    debian = [path for path in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if path.parts[-3].isdigit()]
    debian.sort(key=lambda path: int(path.parts[-3]))
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def backend_uri(pg_port: int) -> str:
    """MLflow's backend store; the password stays out of it (and out of `ps`): libpq reads it from PGPASSFILE."""
    return f"postgresql://{USER}@127.0.0.1:{pg_port}/{DATABASE}"


def tracking_uri(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _as_owner(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam(CLUSTER_OWNER)
    except KeyError:
        raise UserError(f"PostgreSQL will not run as root and there is no {CLUSTER_OWNER!r} user to run it as: "
                        "run team-stack as an ordinary user") from None
    return ["runuser", "-u", CLUSTER_OWNER, "--", *command]


def _give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        owner = pwd.getpwnam(CLUSTER_OWNER)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise UserError(f"{what} failed: {last}")
    return done.stdout


def _check_port_free(port: int, who: str, option: str) -> None:
    with socket.socket() as probe:
        # As servers bind: a port whose last connections are still in TIME_WAIT is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(
                f"port {port} on 127.0.0.1 is in use: {who} cannot listen there (choose another with {option})"
            ) from None


def init_cluster(home: Path, bin_dir: Path) -> None:
    """A new cluster in home/postgres with one password-protected role, unless one is there."""
    cluster = home / "postgres"
    if (cluster / "PG_VERSION").is_file():
        return
    # initdb into a sibling renamed when complete: an interrupted initdb leaves no half-made cluster.
    partial = home / "postgres.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    passfile = home / "pgpass"
    passfile.touch(mode=0o600)
    passfile.write_text(f"127.0.0.1:*:*:{USER}:{password}\n")
    pwfile = home / ".initdb-password"
    pwfile.touch(mode=0o600)
    pwfile.write_text(password + "\n")
    try:
        for path in (partial, pwfile):
            _give_to_owner(path)
        if subprocess.run(_as_owner(["test", "-w", str(partial)]), stdin=subprocess.DEVNULL).returncode != 0:
            raise UserError(f"user {CLUSTER_OWNER!r} (PostgreSQL does not run as root) cannot reach {partial}: "
                            "put the stack in a directory every user may traverse (--dir)")
        _run(_as_owner([str(bin_dir / "initdb"), "-D", str(partial), "-U", USER, "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]), "initdb")
    finally:
        pwfile.unlink()
    partial.rename(cluster)


def postmaster(home: Path) -> tuple[int, int] | None:
    """(pid, port) of the cluster's running server, from its postmaster.pid; None when it is not running."""
    try:
        lines = (home / "postgres" / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    pid, port = int(lines[0]), int(lines[3])
    return (pid, port) if fsio.process_alive(pid) else None


def start_postgres(home: Path, bin_dir: Path, pg_port: int) -> int:
    """The cluster running on 127.0.0.1 (TCP only: no socket directory to own); returns its port."""
    running = postmaster(home)
    if running:
        return running[1]
    options = f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    cluster = home / "postgres"
    _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(cluster), "-l", str(cluster / "server.log"), "-o", options,
                    "-w", "-t", "60", "start"]), f"starting PostgreSQL (log: {cluster / 'server.log'})")
    return pg_port


def ensure_database(home: Path, pg_port: int) -> None:
    try:
        import psycopg
    except ModuleNotFoundError:
        raise UserError("the team stack needs psycopg: pip install -c constraints.txt -e '.[team]'") from None
    with psycopg.connect(host="127.0.0.1", port=pg_port, user=USER, dbname="postgres", passfile=str(home / "pgpass"),
                         connect_timeout=10, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            connection.execute(f"CREATE DATABASE {DATABASE}")


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2):
            return True
    except OSError:
        return False


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_group(pid: int) -> None:
    """End the process group `pid` leads (the server, its uvicorn workers): TERM, then KILL after a while."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            if _group_gone(pid):
                return
            time.sleep(0.2)


def start_mlflow(home: Path, port: int, pg_port: int, workers: int) -> int:
    """`mlflow server` over the cluster, serving artifacts from home/artifacts, in its own process group; its pid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PGPASSFILE=str(home / "pgpass"),
        # Its job runner serves GenAI features we do not use: eight more processes on a small machine.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri(pg_port),
        "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]
    log = home / "mlflow.log"
    with log.open("ab") as sink:
        server = subprocess.Popen(command, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not _healthy(tracking_uri(port)):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_group(server.pid)
            last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"mlflow server did not come up on {tracking_uri(port)}: {last[0]} (log: {log})")
        time.sleep(0.5)
    return server.pid


def configure_remote(project: Path, home: Path) -> str | None:
    """This checkout's default DVC remote: home/dvc-remote, in .dvc/config.local (a path on this machine, not
    for the repository). None outside a DVC project."""
    if not (project / ".dvc").is_dir():
        return None
    remote = home / "dvc-remote"
    remote.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "dvc", "remote", "add", "--local", "--default", "--force", REMOTE, str(remote)],
         "dvc remote add", cwd=project)
    return str(remote)


def read_state(home: Path) -> dict[str, Any]:
    state = home / "stack.json"
    return fsio.read_json(state) if state.is_file() else {}


def server_pid(home: Path) -> int | None:
    """The recorded server's pid while that process is still an MLflow server (not a pid reused since)."""
    pid = read_state(home).get("mlflow_pid")
    if pid is None or not fsio.process_alive(pid):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if b"mlflow" in command and b"server" in command else None


def start(home: Path, project: Path, port: int, pg_port: int, workers: int) -> dict[str, Any]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise UserError("no PostgreSQL here (pg_ctl not found): apt-get install postgresql")
    home.mkdir(parents=True, exist_ok=True)
    # Ports first: a port in use is an error before anything is created or started.
    if postmaster(home) is None:
        _check_port_free(pg_port, "PostgreSQL", "--pg-port")
    if server_pid(home) is None:
        _check_port_free(port, "the MLflow server", "--port")
    init_cluster(home, bin_dir)
    pg_port = start_postgres(home, bin_dir, pg_port)
    ensure_database(home, pg_port)
    if server_pid(home) is None:
        pid = start_mlflow(home, port, pg_port, workers)
        fsio.write_json(home / "stack.json", {"mlflow_pid": pid, "port": port, "pg_port": pg_port})
    configure_remote(project, home)
    return status(home)


def stop(home: Path) -> list[str]:
    """Stop the server and the cluster; what was stopped."""
    stopped = []
    pid = server_pid(home)
    if pid is not None:
        stop_group(pid)
        stopped.append(f"mlflow server (pid {pid})")
    running = postmaster(home)
    bin_dir = postgres_bin()
    if running and bin_dir is not None:
        _run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(home / "postgres"), "-m", "fast", "-w", "-t", "60", "stop"]),
             "stopping PostgreSQL")
        stopped.append(f"PostgreSQL (pid {running[0]})")
    (home / "stack.json").unlink(missing_ok=True)
    return stopped


def status(home: Path) -> dict[str, Any]:
    state = read_state(home)
    running = postmaster(home)
    pid = server_pid(home)
    remote = home / "dvc-remote"
    return {
        "postgres": {"pid": running[0], "port": running[1], "backend_store_uri": backend_uri(running[1]),
                     "data": str(home / "postgres")} if running else None,
        "mlflow": {"pid": pid, "port": state["port"], "tracking_uri": tracking_uri(state["port"]),
                   "healthy": _healthy(tracking_uri(state["port"])), "artifacts": str(home / "artifacts")}
        if pid is not None else None,
        "dvc_remote": str(remote) if remote.is_dir() else None,
    }


def describe(report: dict[str, Any]) -> list[str]:
    """status as lines for people."""
    postgres, server = report["postgres"], report["mlflow"]
    lines = [
        f"postgres: running, pid {postgres['pid']}, 127.0.0.1:{postgres['port']}, data {postgres['data']}" if postgres
        else "postgres: stopped",
        f"mlflow server: {'running' if server['healthy'] else 'not answering'}, pid {server['pid']}, "
        f"{server['tracking_uri']}, artifacts {server['artifacts']}" if server else "mlflow server: stopped",
        f"dvc remote {REMOTE!r}: {report['dvc_remote']}" if report["dvc_remote"] else "dvc remote: none yet",
    ]
    if server:
        lines.append(f"export MLFLOW_TRACKING_URI={server['tracking_uri']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="team-stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=paths.TEAM_STACK, help="where the stack keeps its data (default %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default %(default)s)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="the MLflow server's worker processes (default %(default)s)")
    args = parser.parse_args()
    home = args.dir.resolve()
    if args.action == "stop":
        print("\n".join(f"stopped {what}" for what in stop(home)) or "nothing was running")
        return
    report = start(home, Path.cwd(), args.port, args.pg_port, args.workers) if args.action == "start" else status(home)
    print("\n".join(describe(report)))
    if not (report["postgres"] and report["mlflow"] and report["mlflow"]["healthy"]):
        sys.exit(3)  # as `pg_ctl status`: not (all) running


if __name__ == "__main__":
    run(main)
