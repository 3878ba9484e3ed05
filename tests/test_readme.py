"""Every command the README shows is accepted as written: `cacheaug` lines by cacheaug's own parser (and, where a
config dataclass stands behind the subcommand, its validation), `cacheaug eval harness` lines by lm-eval's own
command-line parser, `torchrun -m cacheaug` lines likewise. The client tests (test_clients.py, test_lm_eval.py) run
the harness and server commands for real on tiny models."""

import re
import shlex
from pathlib import Path

import pytest

from cacheaug.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
GUIDE = README.parent / "docs" / "guide.md"


def readme_commands() -> list[str]:
    """The commands of the README, then of the guide (docs/guide.md), in order."""
    text = README.read_text() + "\n" + GUIDE.read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', "\n".join(lines), flags=re.M))
    out = []
    for line in lines:
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        out.append(line)
    return out


def _cacheaug_argv(line: str) -> list[str] | None:
    line = re.sub(r"<[^>]*>", "X", line).replace(" ...", "").removesuffix(" &")
    argv = shlex.split(line)
    if argv[0] == "cacheaug":
        return argv[1:]
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "cacheaug":
        return argv[argv.index("-m") + 2 :]
    return None


COMMANDS = [c for c in readme_commands() if _cacheaug_argv(c) is not None]


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("cacheaug eval harness") for c in COMMANDS)
    assert readme_commands()[:2] == ["bash scripts/main.sh", "bash scripts/test.sh"]


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_is_accepted(line, monkeypatch):
    argv = _cacheaug_argv(line)
    if argv[:2] == ["eval", "harness"]:
        from lm_eval._cli import HarnessCLI

        cli = HarnessCLI()
        args = cli._parser.parse_args(["run", *argv[2:]])  # lm-eval's own parser, every option as written
        assert args.model == "cacheaug"
        return
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0
        return
    args = build_parser().parse_args(argv)
    config = {"train": "TrainConfig", "adapt": "AdaptConfig"}.get(argv[0])
    if argv[:2] == ["data", "synth"]:
        config = "SynthConfig"
    if config:
        from cacheaug import cli

        cls = {"TrainConfig": "cacheaug.train", "AdaptConfig": "cacheaug.adapt", "SynthConfig": "cacheaug.synth"}[
            config
        ]
        module = __import__(cls, fromlist=[config])
        monkeypatch.chdir(README.parent)  # --config paths are relative to the repo root, as the README runs them
        cli.resolve_config(getattr(module, config), args)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, with the default model swapped for a tiny one of its family (the slow
    tier loads the real model for the commands)."""
    import cacheaug
    from cacheaug.testing import tiny_model, tiny_tokenizer

    block = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    tok = tiny_tokenizer(["The Congress shall make no law respecting an establishment of religion"])
    monkeypatch.setattr(cacheaug, "load_base_model", lambda name, **kw: (tiny_model("gemma3"), tok))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].loss.isfinite() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert scope["text"].shape[1] == scope["ids"].shape[1] + 8
