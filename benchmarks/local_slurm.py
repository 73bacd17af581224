"""A one-node SLURM on this machine, for testing `reproduce.py run --slurm` against the real thing.

  python benchmarks/local_slurm.py start FOLDER   # munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
  python benchmarks/local_slurm.py stop FOLDER    # cancels its jobs, stops the daemons it started (by PID)

Needs root and Debian's packages `slurmctld slurmd slurm-client munge` (22.05 on Debian 12):
`start` installs them with apt-get when they are missing. Everything the cluster writes (munge
key and socket, slurm.conf, state, spool, logs, the daemons' PIDs) lives in FOLDER; nothing under
/etc is changed, and the client commands find the cluster through SLURM_CONF. The node is
`hostname -s` with 2 CPUs and one partition, `debug`, no GPUs (generic resources are not
configured, so a job asking for a GPU is refused, as on a cluster without them). The settings a
test may depend on: KillWait=30 (SLURM's default: SIGTERM, then SIGKILL 30 s later), no accounting,
proctrack/linuxproc (no cgroups needed), free ports picked at start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
STATE_FILE = "daemons.json"
PARTITION = "debug"


class Unavailable(Exception):
    """This machine cannot run the local cluster (not root, no apt, a daemon that will not start)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def install() -> None:
    """The Debian packages, installed when a daemon is missing (root and apt-get needed)."""
    if all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-400:]}")


def slurm_conf(folder: Path, host: str, ports: tuple[int, int], munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=localtest",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=30",
        "MinJobAge=300",
        "SchedulerParameters=sched_interval=2",
        f"NodeName={host} CPUs=2 State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def environment(folder: Path) -> dict[str, str]:
    """The environment that makes sbatch, squeue, scontrol ... talk to this cluster."""
    return {**os.environ, "SLURM_CONF": str(Path(folder).absolute() / "slurm.conf")}


def start(folder: str | Path, timeout: float = 60.0) -> dict:
    """Start munged, slurmctld and slurmd (in the foreground, as our children in their own
    sessions), wait until the node accepts jobs; returns what `stop` needs (also in FOLDER)."""
    if os.geteuid() != 0:
        raise Unavailable("the local cluster's daemons run as root (SlurmUser=root); this is not root")
    install()
    folder = Path(folder).absolute()
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    key, munge_socket = folder / "munge" / "munge.key", folder / "munge" / "socket"
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(slurm_conf(folder, host, (free_port(), free_port()), munge_socket))
    env = environment(folder)
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                   f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--log-file={folder / 'munge' / 'munged.log'}",
                   f"--seed-file={folder / 'munge' / 'munged.seed'}"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(folder / "slurm.conf")],
        "slurmd": ["slurmd", "-D", "-f", str(folder / "slurm.conf")],
    }
    pids: dict[str, int] = {}
    state = {"folder": str(folder), "pids": pids, "slurm_conf": env["SLURM_CONF"], "host": host}
    try:
        for name in DAEMONS:
            with open(folder / f"{name}.out", "w") as out:
                process = subprocess.Popen(commands[name], stdout=out, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            pids[name] = process.pid
            (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
            if name == "munged":
                wait_for(lambda: munge_socket.exists(), 10, "munged did not open its socket", folder)
        wait_for(lambda: node_idle(env), timeout, "the node did not become idle", folder)
    except BaseException:
        stop(folder)
        raise
    return state


def node_idle(env: dict[str, str]) -> bool:
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
    return result.returncode == 0 and result.stdout.strip().startswith("idle")


def wait_for(condition, timeout: float, message: str, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    logs = "; ".join(f"{path.name}: {path.read_text().strip()[-300:]}" for path in sorted(folder.glob("*.out"))
                     if path.read_text().strip())
    raise Unavailable(f"{message} within {timeout:.0f} s ({logs or 'no daemon output'})")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (our own child not yet reaped) is not alive
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(folder: str | Path) -> None:
    """Cancel every job of the cluster, then SIGTERM the daemons this folder started (by PID),
    SIGKILL those still there after 15 s."""
    folder = Path(folder).absolute()
    path = folder / STATE_FILE
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    env = environment(folder)
    if "slurmctld" in state["pids"]:
        subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], capture_output=True, env=env, timeout=30)
        deadline = time.monotonic() + 40  # the job steps end (SIGTERM, KillWait, SIGKILL) before slurmd goes
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
    for name in reversed(DAEMONS):
        pid = state["pids"].get(name)
        if pid is None or not alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/local_slurm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("folder", help="where the cluster's configuration, state and logs go")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.folder)
        return 0
    try:
        state = start(args.folder)
    except Unavailable as error:
        print(f"error: cannot start a local SLURM: {error}", file=sys.stderr)
        return 2
    print(f"SLURM is up on {state['host']} (2 CPUs, partition {PARTITION}). Use it with:\n"
          f"  export SLURM_CONF={state['slurm_conf']}\nStop it with:\n  python benchmarks/local_slurm.py stop {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
