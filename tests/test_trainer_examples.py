"""Every trainer example end to end in its short mode (--steps 2) on SmolLM2: slow, run in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Two steps of a smaller batch than the examples' defaults: every part runs (rollout, logprob check,
# optimizer step, weight push, rollouts from the pushed weights) at a third of the trainer's time.
SHORT = ["--steps", "2", "--prompts", "3", "--max-new-tokens", "12"]


# grpo_cpu runs below in its --deterministic mode, which takes the same path plus the exact logprobs.
@pytest.mark.parametrize("name, extra", [("grpo_disk", ["--every", "1", "--verify"]),
                                         ("two_servers", []), ("ppo_reward_model", []),
                                         ("grpo_router", ["--verify"])])
def test_example_short_run(tmp_path: Path, name: str, extra: list[str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", f"trainer_examples.{name}", *SHORT, "--out", str(out),
                           "--server-device", "cpu", *extra], capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2]
    png = (out / "reward.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    for e in logs:
        assert e["mismatch_tokens"] > 0 and e["mismatch_max"] < 1e-2, e  # server logprobs = the trainer's
        assert e["update_s"] > 0  # every example pushes weights each step in its short mode
    assert logs[1]["rollout_version"] == "step-1", "step 2's rollouts must come from the pushed weights"


def test_grpo_moe_short_run(tmp_path: Path) -> None:
    """GRPO on a tiny MoE served in bf16 (an fp32 trainer): the two route some tokens differently, and
    replaying the server's routing shrinks the trainer's logprob mismatch; step 2 samples from pushed weights."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer_examples.grpo_moe", "--steps", "2", "--out", str(out),
                           "--server-device", "cpu"], capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout[-2000:])
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2]
    assert (out / "reward.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for e in logs:
        assert e["tokens"] > 0 and e["update_s"] > 0, e
        assert e["routing_differs"] > 0, e
        assert e["replay_mismatch_mean"] < e["natural_mismatch_mean"], e
        assert e["replay_mismatch_max"] < 0.2 < e["natural_mismatch_max"], e  # flips cost ~1 nat; bf16 ~5e-2
    assert logs[1]["rollout_version"] == "step-1"


def test_grpo_deterministic_is_exactly_on_policy(tmp_path: Path) -> None:
    """--deterministic: the trainer's logprobs equal the rollout's bitwise, before and after a weight push."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer_examples.grpo_cpu", *SHORT, "--trainer-threads", "1", "--out", str(out),
                           "--server-device", "cpu", "--deterministic", "--verify"],
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert (out / "reward.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert all(e["update_s"] > 0 for e in logs), logs
    assert [e["rollout_version"] for e in logs] == ["default", "step-1"]
    for e in logs:
        assert e["mismatch_tokens"] > 0 and e["mismatch_max"] == 0.0, e


def test_grpo_fleet_short_run(tmp_path: Path) -> None:
    """GRPO on a Ray fleet of two servers behind sglang-router: a group per push, versions checked."""
    pytest.importorskip("ray", reason="grpo_fleet needs ray: pip install .[fleet]")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer_examples.grpo_fleet", *SHORT, "--out", str(out),
                           "--server-device", "cpu", "--servers", "2", "--verify"],
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2]
    assert all(e["mismatch_tokens"] > 0 and e["mismatch_max"] < 1e-2 and e["update_s"] > 0 for e in logs), logs
    assert logs[1]["rollout_version"] == "step-1"
    assert "'step-2'" in proc.stdout
