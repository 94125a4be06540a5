"""The shared training runtime (blade/training/runtime.py): RNG round trips, sealed folders, resume, the time box."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from blade.training import runtime


def _draws(generators: dict) -> list:
    return [random.random(), float(np.random.rand()), float(torch.rand(())),
            float(torch.rand((), generator=generators["torch"])), float(generators["numpy"].random())]


def test_rng_state_round_trip_covers_global_and_named_streams():
    runtime.seed_everything(5)
    generators = {"torch": torch.Generator().manual_seed(1), "numpy": np.random.default_rng(2)}
    state = runtime.rng_state(generators)
    first = _draws(generators)
    runtime.seed_everything(99)  # move every stream on
    generators["torch"].manual_seed(7)
    generators["numpy"] = np.random.default_rng(8)
    _draws(generators)
    runtime.set_rng_state(state, generators)
    assert _draws(generators) == first
    with pytest.raises(KeyError):  # a file of another run (other stream names) does not fit
        runtime.set_generator_states(state["generators"], {"other": torch.Generator()})


def test_generator_states_keep_the_tinyworld_checkpoint_layout():
    """TinyWorld's checkpoints hold {"numpy": bit_generator.state, "torch": ByteTensor}: the same names and values."""
    np_rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(4)
    states = runtime.generator_states({"numpy": np_rng, "torch": gen})
    assert states["numpy"] == np_rng.bit_generator.state and torch.equal(states["torch"], gen.get_state())


def test_sealed_folders_replace_and_latest(tmp_path):
    assert runtime.resolve_resume(None, tmp_path) is None and runtime.resolve_resume("latest", tmp_path) is None
    for step in (1, 3):
        final = runtime.checkpoint_folder(tmp_path, step)
        tmp = runtime.fresh_folder(runtime.temporary_folder(final))
        (tmp / "weights").write_text(f"w{step}")
        runtime.seal_folder(tmp, f"step {step}\n")
        runtime.replace_folder(tmp, final)
    runtime.fresh_folder(tmp_path / "checkpoint-7")  # unsealed (killed mid-write): never resumed from
    assert runtime.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert runtime.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-3"
    assert runtime.resolve_resume(str(tmp_path / "checkpoint-1"), tmp_path) == tmp_path / "checkpoint-1"
    assert runtime.previous_checkpoint(tmp_path / "checkpoint-3") == tmp_path / "checkpoint-1"
    # rewriting a checkpoint replaces it whole, leaving no .tmp / .old beside it
    tmp = runtime.fresh_folder(runtime.temporary_folder(tmp_path / "checkpoint-3"))
    (tmp / "weights").write_text("again")
    runtime.seal_folder(tmp, "step 3\n")
    runtime.replace_folder(tmp, tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / "weights").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-7"]


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "state.json"
    runtime.atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runtime.atomic_write(path, fail)
    assert path.read_text() == "old"


def test_time_box():
    now = [100.0]
    box = runtime.TimeBox.of_minutes(1.0, clock=lambda: now[0])
    assert not box.expired() and box.remaining_s() == 60.0
    now[0] = 160.5
    assert box.expired() and box.remaining_s() == 0.0
    assert not runtime.TimeBox.of_minutes(None).expired()


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process started in the background by a
    non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and "a second Ctrl-C acts as before" would then
    rightly do nothing."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_time_box_stop_on_signals_expires_once_then_restores_the_handler(python_sigint):
    """The first SIGINT expires the box (no KeyboardInterrupt); a second acts as before (Ctrl-C twice aborts);
    leaving the block puts the previous handlers back."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    box = runtime.TimeBox.of_minutes(60.0)
    with box.stop_on_signals():
        assert not box.expired() and box.stopped_by is None
        signal.raise_signal(signal.SIGINT)
        assert box.expired() and box.remaining_s() == 0.0 and box.stopped_by == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # still caught: it has not fired
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_time_box_stop_on_signals_survives_repeated_sigterm(python_sigint):
    """GNU timeout signals its child and then the child's process group, and a wrapper may forward the signal
    again: the second and third SIGTERM must not kill the run while it writes its checkpoint (the box stays
    expired, the handler stays installed); the previous handler is back after the block."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    box = runtime.TimeBox.of_minutes(60.0)
    with box.stop_on_signals():
        for _ in range(3):
            signal.raise_signal(signal.SIGTERM)  # with the default handler this would end the test process
            assert box.expired() and box.stopped_by == "SIGTERM"
        signal.raise_signal(signal.SIGINT)  # a Ctrl-C after a SIGTERM: the run is already stopping, Ctrl-C aborts
        assert box.stopped_by == "SIGTERM"  # the first cause is the one reported
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_study_wait_all_outlasts_repeated_stop_notices(tmp_path):
    """benchmarks/wait_all.sh, as tinyworld_study.sh uses it with its forwarding trap: two stop notices 0.4 s apart
    (a preemption notice repeated, a timeout's TERM after a manual one) each interrupt bash's `wait`; the script
    must still wait until both fake trainers have finished writing (trainer a 2 s after its notice, b 1 s) before
    it archives. A single retry of `wait` gave up on a at the second notice and archived without it."""
    import signal
    import subprocess
    import time

    wait_all = Path(__file__).resolve().parents[1] / "benchmarks" / "wait_all.sh"
    script = tmp_path / "study.sh"
    script.write_text(f"""
cd {tmp_path}
pids=()
for n in a:2 b:1; do
  bash -c 'stop=; trap "stop=1" TERM; touch ready_'${{n%:*}}'; while [ -z "$stop" ]; do sleep 0.05; done
           sleep '${{n#*:}}'; touch done_'${{n%:*}} &
  pids+=($!)
done
trap 'kill -TERM "${{pids[@]}}" 2> /dev/null' TERM
source {wait_all}
wait_all "${{pids[@]}}"; echo "status=$? archived: $(ls done_* 2> /dev/null | tr '\\n' ' ')"
""")
    study = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready_{n}").exists() for n in "ab") and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(2):
        time.sleep(0.4)
        study.send_signal(signal.SIGTERM)
    out, _ = study.communicate(timeout=60)
    assert "status=0 archived: done_a done_b" in out
