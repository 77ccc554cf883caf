"""A run killed with SIGKILL mid-training resumes from its last complete checkpoint, and the resumed run's
losses equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memfit.train.finetune.trainer import run
from tests.train.test_finetune import cfg, make_tiny, write_chat_data


@pytest.mark.slow  # a second process (torch import) and a checkpoint per step: ~20 s on an idle 2-core machine
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    model = make_tiny(tmp_path / "m")
    data = write_chat_data(tmp_path / "chat.jsonl")
    save = tmp_path / "save"
    cmd = [sys.executable, "-m", "memfit.cli", "train", "finetune", "--model", str(model), "--data", str(data),
           "--steps", "400", "--batch-size", "2", "--seq-len", "48", "--lr", "1e-3", "--seed", "1",
           "--save", str(save), "--save-every", "1", "--no-progress", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a few checkpoints, then kill it wherever it is
            latest = save / "latest"
            if latest.is_file() and int(latest.read_text().split("-")[1]) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(0.03)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = int((save / "latest").read_text().split("-")[1])
    assert 2 <= done < 400
    steps = done + 1
    resumed = run(cfg(model, tmp_path, data=str(data), steps=steps, resume=str(save)))
    assert resumed.start_step == done
    fresh = run(cfg(model, tmp_path, data=str(data), steps=steps))
    assert resumed.all_losses == fresh.losses
    state = json.loads((save / f"step-{done:08d}" / "trainer_state.json").read_text())
    assert state["losses"] == fresh.losses[:done]
