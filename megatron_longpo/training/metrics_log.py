"""Rank-0 progress line, TensorBoard and wandb logging."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional

import yaml

from megatron_longpo.config import LoggingConfig
from megatron_longpo.fsutil import write_text_atomic


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(max(0, seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_line(step: int, total: int, metrics: Mapping[str, float], elapsed: float, eta: float) -> str:
    """One progress line; metric keys use the TRL names (loss, rewards/margins, ...)."""
    parts = [f"step {step}/{total}"]
    if metrics.get("epoch") is not None:
        parts.append(f"epoch {metrics['epoch']:.2f}")
    order = [
        ("lr", "lr", "{:.3e}"), ("loss", "loss", "{:.5f}"), ("nll_loss", "nll", "{:.4f}"),
        ("pref_loss", "pref", "{:.5f}"), ("rewards/accuracies", "acc", "{:.3f}"),
        ("rewards/margins", "margin", "{:+.4f}"), ("rewards/chosen", "r_w", "{:+.4f}"),
        ("rewards/rejected", "r_l", "{:+.4f}"), ("grad_norm", "grad_norm", "{:.3f}"),
        ("tokens_per_sec", "tok/s", "{:.0f}"), ("tflops_per_gpu", "TFLOP/s/GPU", "{:.2f}"),
    ]
    for key, label, fmt in order:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    parts.append(f"elapsed {_hms(elapsed)}")
    parts.append(f"eta {_hms(eta)}")
    return " | ".join(parts)


def format_eval_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """Task accuracies of ``{task}/len{L}/accuracy`` keys, grouped by length (evaluation/suite.py)."""
    by_len: dict[int, list[str]] = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "accuracy" and parts[1].startswith("len") and parts[0] != "mean":
            by_len.setdefault(int(parts[1][3:]), []).append(f"{parts[0]} {100 * v:.1f}%")
    groups = [f"len {n}: mean {100 * metrics.get(f'mean/len{n}/accuracy', float('nan')):.1f}% ({', '.join(cells)})"
              for n, cells in sorted(by_len.items())]
    return " | ".join([f"[eval] step {step}/{total}"] + groups)


def drop_steps_after(path: Path, step: int) -> int:
    """Remove the lines of a metrics JSONL logged after ``step`` (a resumed run logs them again).

    The file is rewritten atomically; returns the number of lines dropped. Lines that are not
    JSON (a torn last line of a killed run) are dropped too.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(rec.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_text_atomic(path, "".join(f"{x}\n" for x in keep))
    return dropped


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(configured: Optional[str], save_dir: Optional[str]) -> Optional[str]:
    """The wandb run id of this run: ``logging.wandb_run_id``, else the id kept in
    ``checkpoint.save/wandb_run_id`` (created on first use), else None (wandb picks one).
    Rank 0 only: the file is written once, atomically."""
    if configured:
        return configured
    if not save_dir:
        return None
    f = Path(save_dir) / WANDB_ID_FILE
    if f.is_file() and f.read_text().strip():
        return f.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    f.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(f, run_id + "\n")
    return run_id


class MetricsLogger:
    """Console line every ``log_interval`` steps plus TensorBoard / wandb scalars (rank 0 only)."""

    def __init__(self, cfg: LoggingConfig, total_steps: int, is_rank0: bool, run_config: Optional[dict] = None,
                 start_step: int = 0, save_dir: Optional[str] = None) -> None:
        self.cfg = cfg
        self.total = total_steps
        self.rank0 = is_rank0
        self.t0 = time.time()
        self.start_step = start_step
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not is_rank0:
            return
        if cfg.metrics_jsonl:
            Path(cfg.metrics_jsonl).parent.mkdir(parents=True, exist_ok=True)
            drop_steps_after(Path(cfg.metrics_jsonl), start_step)
            self.jsonl = open(cfg.metrics_jsonl, "a")
        if cfg.tensorboard_dir:
            # deferred: tensorboard loads only when training.tensorboard_dir asks for it
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a preempted run logged after its last checkpoint are replayed by
            # the resumed run; TensorBoard drops the old ones instead of drawing both.
            self.tb = SummaryWriter(log_dir=cfg.tensorboard_dir, purge_step=start_step + 1 if start_step else None)
            if run_config:  # the resolved config, next to the curves it produced
                self.tb.add_text("config", "```yaml\n" + yaml.safe_dump(run_config, sort_keys=False) + "```", start_step)
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            try:
                import wandb  # optional: wandb is the 'wandb' extra
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: "
                                   "pip install 'megatron_longpo[wandb]' or unset logging.wandb_project") from e
            # resume="allow": a requeued / resumed run appends to the same wandb run (same id).
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, mode=cfg.wandb_mode,
                                    config=run_config or {}, id=wandb_run_id(cfg.wandb_run_id, save_dir),
                                    resume="allow")

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> Optional[str]:
        if not self.rank0:
            return None
        for k, v in metrics.items():
            if v is None:
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items() if v is not None}, step=step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if prefix != "train" or step % self.cfg.log_interval == 0 or step == self.total:
            elapsed = time.time() - self.t0
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            line = format_line(step, self.total, metrics, elapsed, eta)
            if prefix == "eval":
                line = format_eval_line(step, self.total, metrics)
            elif prefix != "train":
                line = f"[{prefix}] " + line
            print(line, flush=True)
            return line
        return None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
