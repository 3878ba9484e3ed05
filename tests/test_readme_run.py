"""Every command the README and the guide (docs/guide.md) show runs as written on a CPU machine, in their order (the
README's first), in a fresh folder (slow tier: the real Gemma 3 270M; about 15 minutes on 2 cores, 4 of them the main
job).

How each line is checked:
* ``cacheaug train ...`` / ``cacheaug adapt ...`` (up to thousands of steps: hours on a CPU) run until their first
  optimizer step is done, then get Ctrl-C (SIGINT), which must save a checkpoint and exit 0, as the README says;
  later lines use those checkpoints (``--checkpoint runs/copro`` takes a run's newest checkpoint);
* a line ending in ``&`` (the server) starts in the background; the lines after it run once it answers /health;
* ``curl`` lines must get a JSON answer without an error;
* every other line must finish with exit status 0;
* ``NAME="..."`` lines set shell variables for the lines after them.
``bash scripts/main.sh`` and ``pip install -e ...`` run at the repository's root, as a user of a fresh clone types
them; every other line runs in
a fresh folder (what it writes, runs/ and the rest, stays out of the checkout).
Blocks marked ``<!-- gpu-only`` need CUDA; tests/test_readme.py checks them with the real parsers. The README's
second line (``bash scripts/test.sh``) is the command that runs this test, so it is not run again here.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEP_DONE = re.compile(r"(train|adapt):\s+\d+%\|[^|]*\|\s*[1-9]\d*/\d+")


DOCS = (ROOT / "README.md", ROOT / "docs" / "guide.md")
TIMINGS = Path(os.environ.get("TMPDIR", "/tmp")) / "cacheaug_tour_times.txt"


def runnable_lines() -> list[str]:
    text = "\n".join(doc.read_text() for doc in DOCS)
    lines = []
    for gpu_marker, block in re.findall(r"(<!-- gpu-only[^\n]*\n)?```bash\n(.*?)```", text, flags=re.S):
        if gpu_marker:
            continue
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it, even when this test runs in a background job (which starts with SIGINT
    ignored, and a Python started so keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Proc:
    """A command run through bash (``exec``: signals reach it), its output collected while it runs."""

    def __init__(self, preamble: str, line: str, cwd: Path):
        self.line = line
        self.p = subprocess.Popen(
            ["bash", "-c", f"{preamble}exec {line}"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Whatever the command has written, as soon as it is written (a progress bar's first step is seen at once,
        not when 256 characters have piled up: the Ctrl-C of a training line then comes right after its first step)."""
        import codecs

        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        for chunk in iter(lambda: os.read(self.p.stdout.fileno(), 4096), b""):
            self.out.append(decode(chunk))

    def text(self) -> str:
        return "".join(self.out)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            pytest.fail(f"`{self.line}` did not finish in {timeout:.0f} s; output tail:\n{self.text()[-3000:]}")


def _health(port: int = 8000) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_every_readme_command_runs_as_written(tmp_path):
    lines = runnable_lines()
    assert lines[:2] == ["bash scripts/main.sh", "bash scripts/test.sh"]
    preamble, background, ran, timings = "", [], [], []
    try:
        for line in lines:
            if line == "bash scripts/test.sh":
                continue
            if re.fullmatch(r'\w+="[^"]*"', line):
                preamble += line + "; "
                continue
            if line.endswith("&"):
                proc = Proc(preamble, line[:-1].strip(), tmp_path)
                background.append(proc)
                deadline = time.monotonic() + 600
                while not _health():
                    assert proc.p.poll() is None, f"`{line}` exited: {proc.text()[-3000:]}"
                    assert time.monotonic() < deadline, f"`{line}` never answered /health"
                    time.sleep(1)
                ran.append(line)
                continue
            t0 = time.monotonic()
            argv = shlex.split(line)
            long_run = argv[:2] in (["cacheaug", "train"], ["cacheaug", "adapt"]) and "--help" not in argv
            at_root = argv[:2] == ["bash", "scripts/main.sh"] or argv[:3] == ["pip", "install", "-e"]  # as from a clone
            proc = Proc(preamble, line, ROOT if at_root else tmp_path)
            if long_run:
                deadline = time.monotonic() + 1800
                while not STEP_DONE.search(proc.text()):
                    assert proc.p.poll() is None, f"`{line}` exited before its first step:\n{proc.text()[-3000:]}"
                    assert time.monotonic() < deadline, f"`{line}` did no step in 30 minutes"
                    time.sleep(2)
                proc.p.send_signal(signal.SIGINT)  # Ctrl-C: save a checkpoint and exit
            rc = proc.wait(1800)
            assert rc == 0, f"`{line}` failed ({rc}):\n{proc.text()[-3000:]}"
            if long_run:
                out_dir = tmp_path / argv[argv.index("--out-dir") + 1]
                marker = "config.json" if argv[1] == "adapt" else "step_*/coprocessor_config.json"
                assert list(out_dir.glob(marker)), f"`{line}` saved nothing in {out_dir}:\n{proc.text()[-2000:]}"
            if argv[0] == "curl":
                answer = json.loads(proc.text())
                assert "error" not in answer and answer, answer
            ran.append(line)
            timings.append((time.monotonic() - t0, line))
    finally:
        for proc in background:
            proc.p.send_signal(signal.SIGINT)
            try:
                proc.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.p.pid, signal.SIGKILL)
    # where the tour's time goes (.ci/run prints this file after the slow tier)
    TIMINGS.write_text("".join(f"{t:7.1f} s  {line[:110]}\n" for t, line in sorted(timings, reverse=True)))
    expected = [line for line in lines if line != "bash scripts/test.sh" and not re.fullmatch(r'\w+="[^"]*"', line)]
    assert ran == expected and len(ran) >= 15 and any(line.startswith("curl") for line in ran)
