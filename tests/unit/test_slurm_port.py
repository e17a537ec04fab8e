"""The launcher's default rendezvous port stays out of Linux's ephemeral port range: there the
kernel hands ports to any process's outgoing connections and to gloo / NCCL listeners, and a job
whose port was taken failed with EADDRINUSE (seen in CI: job 58063 -> port 38063)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EPHEMERAL_LOW = 32768  # Linux default net.ipv4.ip_local_port_range: 32768 60999


def test_default_master_port_is_below_the_ephemeral_range():
    text = (ROOT / "examples/slurm/longpo_launch.sh").read_text()
    line = re.search(r"MASTER_PORT=(\$\{MASTER_PORT:-.*\})", text)
    assert line, "longpo_launch.sh no longer sets a default MASTER_PORT"
    ids = [0, 1, 11999, 12000, 12768, 20000, 58063, 99999, 2**31 - 1]
    script = "for SLURM_JOB_ID in " + " ".join(map(str, ids)) + f"; do unset MASTER_PORT; echo {line.group(1)}; done"
    ports = [int(p) for p in subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                            check=True).stdout.split()]
    assert len(ports) == len(ids) and all(1024 <= p < EPHEMERAL_LOW for p in ports), dict(zip(ids, ports))
    assert len(set(ports[:3])) == 3  # neighbouring jobs get different ports
