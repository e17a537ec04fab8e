"""A real one-node Slurm for the template tests, installed and started when missing.

Debian's slurm-wlm + munge (apt-get, as root), a private slurm.conf in a temp dir
(proctrack/linuxproc, task/none, node ``localhost`` so the rendezvous host is loopback), its own
ports, and daemons that are stopped again by pid. Client commands get ``SLURM_CONF`` in their env.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

APT_PACKAGES = ["slurm-wlm", "munge"]
CTLD_PORT, SLURMD_PORT = 16817, 16818


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here (the reason says why)."""


def _sh(args, check=True, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}: {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    p = _sh(install, check=False, timeout=900, env=env)
    if p.returncode != 0:  # stale or missing package lists on a fresh machine
        _sh(["apt-get", "update"], check=False, timeout=600, env=env)
        p = _sh(install, check=False, timeout=900, env=env)
    if p.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {(p.stdout + p.stderr)[-1500:]}")


def _munge_works() -> bool:
    return shutil.which("munge") is not None and subprocess.run(
        "munge -n | unmunge", shell=True, capture_output=True).returncode == 0


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus = cpus
        self.pids: list[int] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        ensure_installed()
        self._start_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        first_id = 1000 + int(time.time()) % 100000 * 10  # unique log names across test sessions
        self.conf.write_text(f"""\
ClusterName=longpotest
SlurmctldHost=localhost
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=20
MinJobAge=3600
FirstJobId={first_id}
NodeName=localhost NodeHostname=localhost CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        _sh(["slurmctld", "-f", str(self.conf)], env=self.env)
        self._remember_pid("slurmctld.pid")
        _sh(["slurmd", "-f", str(self.conf), "-N", "localhost"], env=self.env)
        self._remember_pid("slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            p = _sh(["sinfo", "-h", "-o", "%t"], check=False, env=self.env)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise SlurmUnavailable(f"slurm did not come up: {self.log_tail()}")

    def _start_munge(self) -> None:
        if _munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _sh(["mungekey", "--create"])
            shutil.chown(key, "munge", "munge")
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        _sh(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"])
        pidfile = run / "munged.pid"
        for _ in range(50):
            if _munge_works():
                if pidfile.exists():
                    self.pids.append(int(pidfile.read_text().split()[0]))
                return
            time.sleep(0.1)
        raise SlurmUnavailable("munged did not start")

    def _remember_pid(self, name: str) -> None:
        for _ in range(50):
            f = self.root / name
            if f.exists() and f.read_text().strip():
                self.pids.append(int(f.read_text().split()[0]))
                return
            time.sleep(0.1)

    def stop(self) -> None:
        _sh(["scancel", "--user=root"], check=False, env=self.env)
        for pid in reversed(self.pids):  # only the daemons this fixture started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def log_tail(self, n: int = 2000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(out)

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(self, args: list, env: dict, cwd: Path) -> int:
        p = _sh(["sbatch", "--parsable", *map(str, args)], env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def run(self, *args) -> str:
        return _sh(list(map(str, args)), env=self.env).stdout

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = _sh(["scontrol", "show", "job", str(job_id)], env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait_state(self, job_id: int, states: tuple, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if j["JobState"] in states:
                return j
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}")

    def release(self, job_id: int, **update) -> None:
        """A requeued job waits (BeginTime); start it now (optionally with other updates).

        Only once the node is idle again: a slot started while the previous one is still being
        cleaned up fails ("Job credential revoked")."""
        deadline = time.time() + 120
        while _sh(["sinfo", "-h", "-o", "%t"], check=False, env=self.env).stdout.strip() != "idle":
            if time.time() > deadline:
                raise TimeoutError(f"node not idle: {self.log_tail()}")
            time.sleep(0.3)
        time.sleep(1.0)
        extra = [f"{k}={v}" for k, v in update.items()]
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *extra)

    def signal(self, job_id: int, sig: str, *flags: str) -> None:
        self.run("scancel", f"--signal={sig}", *flags, job_id)

    def cancel(self, job_id: int) -> None:
        self.run("scancel", job_id)

