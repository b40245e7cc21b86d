"""Every example the README and `ewq COMMAND --help` show runs (issue 39, item 0).

The examples are read from the documents themselves: the README's ```bash and
```python blocks and each command's help epilog. Each group (a README block, a
command's epilog) runs in order, in a folder of its own that holds the inputs the
examples name under those names: the bundled model is itself, the big checkpoints
the examples name (`./Llama-3.2-1B`, `./Qwen2.5-1.5B`, the hub id `Qwen/Qwen2.5-7B`)
are tiny random models of that architecture with the bundled model's tokenizer (so
llama.cpp's converter takes them), IgLM is a tiny F32 Llama that llama.cpp
tokenizes, texts are slices of WikiText-2. An example that names a file an earlier
one of its group writes reads that file.

What does not run here says why in NOT_RUN: servers that wait for requests, and the
commands whose examples take minutes on the bundled model as written, which other
tests run reduced (named there; this test checks those still exist). Every example,
run or not, must parse: its command and options are the CLI's. An entry of NOT_RUN
or SHRINK that no document shows any more fails the test, as does an example no
group ran.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path

import pytest
from models import build_hf, byte_vocab_llama, shared_data
from test_cli import run

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: examples not run here, by their first words: why, and the test that runs them
NOT_RUN = {
    "ewq worker": ("an RPC server: runs until stopped", "test_cluster.py"),
    "ewq serve": ("needs the plan's worker machines or a port", "test_serve_cli.py"),
    "ewq bench default": (
        "the paper's tables: minutes on the bundled model",
        "test_bench.py::test_bench_smoke_on_the_default_model",
    ),
    "ewq compare default": (
        "every criterion and preset: an hour on the bundled model",
        "test_bench.py::test_compare_against_a_preset",
    ),
    "ewq compare IgLM-F32.gguf": (
        "every criterion and preset over 512 windows",
        "test_bench.py::test_compare_against_a_preset",
    ),
    "ewq eval default --task mmlu": (
        "200 questions",
        "test_eval.py::test_eval_mmlu_on_the_default_model",
    ),
}

#: groups run on another model than the one they name, by an example of theirs: the
#: bundled model's calibrated plan takes 4 minutes as written (the kl criterion's
#: 32 probes, 20 type files, 5 measured plans; at least 14 probes, one per role's
#: first and last tensor, whatever --probes says); the same commands run on the tiny
#: F32 Llama llama.cpp tokenizes
ON_MODEL = {"ewq plan default --memory 230MB --calibration": "IgLM-F32.gguf"}

#: options appended to an example (by its first words) that only shrink its work
SHRINK = {"ewq eval default --": ("--limit", "2", "--ctx", "128")}  # 20 windows of 512


def _commands(line: str) -> list[str]:
    """The ewq commands of a shell line: `&&` chains split, `.venv/bin/` and a
    trailing comment dropped."""
    out = []
    for part in line.split("&&"):
        part = re.sub(r"\s#.*$", "", part).strip()
        part = part.removeprefix(".venv/bin/")
        if part.startswith("ewq "):
            out.append(part)
    return out


def readme_groups() -> list[tuple[str, list[tuple[str, str]]]]:
    """The README's code blocks in order: (id, [(kind, text)]) where kind is
    "ewq" (a command), "file" (a heredoc: "NAME\\ncontent") or "python" (a block)."""
    groups = []
    lines = README.read_text(encoding="utf-8").splitlines()
    k = 0
    while k < len(lines):
        fence = re.match(r"\s*```(bash|python)\s*$", lines[k])
        if not fence:
            k += 1
            continue
        start, body = k + 1, []
        k += 1
        while not re.match(r"\s*```\s*$", lines[k]):
            body.append(lines[k])
            k += 1
        k += 1
        items: list[tuple[str, str]] = []
        if fence.group(1) == "python":
            items.append(("python", "\n".join(_dedent(body))))
        else:
            j = 0
            body = _dedent(body)
            while j < len(body):
                heredoc = re.match(r"cat > (\S+) <<'EOF'$", body[j].strip())
                if heredoc:
                    end = body.index("EOF", j)
                    text = "\n".join(body[j + 1 : end]) + "\n"
                    items.append(("file", f"{heredoc.group(1)}\n{text}"))
                    j = end + 1
                    continue
                items += [("ewq", c) for c in _commands(body[j])]
                j += 1
        if items:
            groups.append((f"README.md:{start}", items))
    return groups


def _dedent(body: list[str]) -> list[str]:
    indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
    return [b[indent:] for b in body]


def help_groups() -> list[tuple[str, list[tuple[str, str]]]]:
    """Each command's help epilog: the lines that are ewq commands (a remark after
    three spaces, in parentheses, dropped)."""
    import typer

    from ewq.cli import app

    def walk(cmd, path=()):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    groups = []
    for path, cmd in walk(typer.main.get_command(app)):
        items = []
        for line in (cmd.epilog or "").splitlines():
            line = re.split(r"\s{3,}\(", line.strip())[0]
            if line.startswith("ewq "):
                items.append(("ewq", line))
        if items:
            groups.append((f"ewq {' '.join(path)} --help", items))
    return groups


GROUPS = readme_groups() + help_groups()
EXAMPLES = [text for _, items in GROUPS for kind, text in items if kind == "ewq"]


def _not_run(example: str) -> tuple[str, str] | None:
    return next((v for k, v in NOT_RUN.items() if example.startswith(k)), None)


def test_every_example_is_found_and_every_exception_still_meant():
    """The README and the epilogs hold examples; each entry of NOT_RUN and SHRINK
    matches one of them, and the test a NOT_RUN entry names exists."""
    assert len(GROUPS) >= 10 and len(EXAMPLES) >= 25
    for key in [*NOT_RUN, *SHRINK, *ON_MODEL]:
        assert any(e.startswith(key) for e in EXAMPLES), f"no example is {key!r}"
    for _, where in NOT_RUN.values():
        file, _, name = where.partition("::")
        text = (Path(__file__).parent / file).read_text(encoding="utf-8")
        assert not name or f"def {name}(" in text, where


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_parses(example):
    """Its command and options are the CLI's (click parses it as the shell would
    pass it, without running it)."""
    _parse(example)


def test_a_misspelt_option_does_not_parse():
    # typer's own copy of click raises these (its classes are private)
    with pytest.raises(Exception, match="No such option: --memroy"):
        _parse("ewq plan default --memroy 2GB")
    with pytest.raises(Exception, match="'kll' is not one of"):
        _parse("ewq plan default --memory 2GB --criterion kll")


def _parse(example: str) -> None:
    import typer

    from ewq.cli import app

    args = shlex.split(example)[1:]
    cmd = typer.main.get_command(app)
    while hasattr(cmd, "commands"):  # groups: `ewq dataset build`, `ewq fast train`
        name = args.pop(0)
        assert name in cmd.commands, f"no command {name!r}"
        cmd = cmd.commands[name]
    cmd.make_context(name, args)  # raises on an unknown option or bad value


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_tokenizer) -> Path:
    """The inputs the examples name, under their names."""
    root = tmp_path_factory.mktemp("world")
    wiki = (shared_data() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    # about 1,500 tokens each: an importance matrix's two windows of 512
    for k, name in enumerate(["calibration.txt", "wiki.txt", "wiki.train.txt"]):
        (root / name).write_text(wiki[k * 6_000 : (k + 1) * 6_000], encoding="utf-8")
    # models live in a store the groups' folders link to: one path each, so what
    # ewq caches by path (a checkpoint's scratch conversion) serves every group
    store = tmp_path_factory.mktemp("store")
    llama = build_hf("llama", store / "llama", vocab_size=49152)
    for f in smollm2_tokenizer.iterdir():
        shutil.copy(f, llama / f.name)
    # (a Qwen2 with this tokenizer: llama.cpp's converter knows its hash for Llama
    # only; Qwen2's own conversion is test_convert's)
    for name in ("Llama-3.2-1B", "Llama-3.1-8B", "Qwen2.5-1.5B"):
        (root / name).symlink_to(llama)
    (root / "path" / "to").mkdir(parents=True)
    (root / "path" / "to" / "model").symlink_to(llama)
    iglm = byte_vocab_llama(store / "IgLM-F32.gguf")
    for name in ("IgLM-F32.gguf", "model.gguf"):
        (root / name).symlink_to(iglm)
    residues = "E V Q L V E S G G G L V Q P G G S L R L S C A A S G F T F S S Y A M S"
    (root / "seqs.txt").write_text((residues + "\n") * 64, encoding="utf-8")
    (root / "cluster.yaml").write_text(
        "machines:\n  - {name: laptop, memory: 120MB}\n"
        "  - {name: desk, memory: 200MB, host: 10.0.0.2:50052}\n"
    )
    return root


@pytest.fixture
def hub(world, monkeypatch, tmp_path):
    """`Qwen/Qwen2.5-7B` on the local stand-in hub: the tiny Llama."""
    from hubserver import FakeHub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub({"Qwen/Qwen2.5-7B": (world / "Llama-3.2-1B").resolve()}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _outputs(items) -> set[str]:
    """The files a group's commands write (`--out`, `--json`, `--plot`)."""
    out = set()
    for kind, text in items:
        words = shlex.split(text) if kind == "ewq" else []
        for flag, value in zip(words, words[1:], strict=False):
            if flag in ("--out", "--json", "--plot"):
                out.add(value)
    return out


def _run_python(code: str) -> None:
    """A README Python block, statement by statement: a statement whose line says
    `# EwqError` must raise one."""
    from ewq.errors import EwqError

    namespace: dict = {}
    for node in ast.parse(code).body:
        line = code.splitlines()[node.lineno - 1]
        compiled = compile(ast.Module([node], []), "<README>", "exec")
        if "# EwqError" in line:
            with pytest.raises(EwqError):
                exec(compiled, namespace)
        else:
            exec(compiled, namespace)


@pytest.mark.parametrize("group", [g for g, _ in GROUPS])
def test_every_example_runs(group, world, hub, monkeypatch, capsys, tmp_path):
    """The group's examples in order, in a copy of the inputs: each ends with exit
    status 0 (or, for a Python statement marked so, the error it shows)."""
    items = dict(GROUPS)[group]
    model = next(
        (m for k, m in ON_MODEL.items() for _, t in items if t.startswith(k)), None
    )
    cwd = tmp_path / "cwd"
    shutil.copytree(world, cwd, symlinks=True)
    for name in _outputs(items):  # what the group writes is not there before it
        (cwd / name).unlink(missing_ok=True)
    monkeypatch.chdir(cwd)
    for kind, text in items:
        if kind == "file":
            name, _, content = text.partition("\n")
            (cwd / name).write_text(content)
        elif kind == "python":
            _run_python(text)
        elif _not_run(text) is None:
            args = shlex.split(text)[1:]
            if model is not None:
                args = [model if a == "default" else a for a in args]
            args += next((list(v) for k, v in SHRINK.items() if text.startswith(k)), [])
            code, _, err = run(monkeypatch, capsys, *args)
            assert code == 0, f"{text}\n{err}"
