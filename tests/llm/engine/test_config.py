"""EngineConfig refuses a bad device or context length with a message, before torch is asked (no traceback)."""
from __future__ import annotations

import re

import pytest
import torch

from memfit.cli import main as memfit_main
from memfit.llm.engine.config import EngineConfig


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "", "cpu:0:1"])
def test_unknown_device_names_are_refused(device):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        EngineConfig(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_names_the_engine_runs_on_are_accepted(device):
    assert EngineConfig(device=device).device == device


def test_cuda_without_a_cuda_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device is usable here"):
        EngineConfig(device="cuda").resolved_device()
    assert EngineConfig(device="auto").resolved_device().type == "cpu"


def test_cuda_index_past_the_last_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert EngineConfig(device="cuda:1").resolved_device() == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 CUDA device"):
        EngineConfig(device="cuda:2").resolved_device()


@pytest.mark.parametrize("n", [0, -5, True, 1.5])
def test_max_model_len_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=n)
    assert EngineConfig(max_model_len=None).max_model_len is None
    assert EngineConfig(max_model_len=7).max_model_len == 7


def test_cli_refuses_a_bad_device_and_context_without_traceback(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for flags, words in ((["--device", "tpu"], "auto, cpu, cuda or cuda:N"),
                         (["--device", "cuda"], "no CUDA device"),
                         (["--max-model-len", "0"], "max_model_len"),
                         (["--max-model-len", "-5"], "max_model_len")):
        assert memfit_main(["generate", "hi", "--max-tokens", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_kv_reclaim_idle_s_must_be_a_finite_number_of_seconds(value, capsys):
    # NaN passed the `< 0` check and made "idle for longer than NaN seconds" never true
    with pytest.raises(ValueError, match=r"kv_reclaim_idle_s \(--kv-reclaim-idle-s\) must be a finite"):
        EngineConfig(kv_reclaim_idle_s=value)
    assert memfit_main(["generate", "hi", "--kv-reclaim-idle-s", str(value)]) == 2
    err = capsys.readouterr().err
    assert "--kv-reclaim-idle-s" in err and "Traceback" not in err
    EngineConfig(kv_reclaim_idle_s=0.0)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(kv_budget=0), "--kv-budget"),
    (dict(memory_budget="0"), "--memory-budget"),
    (dict(memory_budget="150%"), "--memory-budget"),
    (dict(kv_reclaim_watermark="150%"), "--kv-reclaim-watermark"),
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(max_num_seqs=2.5), "--max-num-seqs"),
])
def test_a_bad_size_or_count_is_refused_naming_its_option(kwargs, flag):
    # --kv-budget 0 and --memory-budget 0 used to give one message naming neither; --max-num-seqs 0 said "max_seqs"
    with pytest.raises(ValueError, match=re.escape(flag)):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(preemption_mode="swap", swap_ssd_space="1GiB"), "--swap-ssd-space"),
    (dict(preemption_mode="swap", swap_ssd_prewrite=True), "--swap-ssd-prewrite"),
    (dict(kv_block_groups=True), "--kv-block-groups"),
])
def test_an_option_that_qualifies_a_missing_one_is_refused_not_ignored(kwargs, flag, tmp_path):
    with pytest.raises(ValueError, match=re.escape(flag)):
        EngineConfig(**kwargs)
    # with the option it qualifies, accepted
    needed = dict(kv_cache="paged") if "kv_block_groups" in kwargs else dict(swap_ssd_path=str(tmp_path))
    EngineConfig(**kwargs, **needed)
