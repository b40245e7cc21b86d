"""The FastEWQ dataset: one row per transformer block, labelled by the EWQ decision.

Columns as in the paper (docs/method.md section 6): model_name, num_blocks, exec_index,
num_parameters, quantization_type (raw | 8-bit | 4-bit), quantized (0 | 1). A
``label_source`` column says where each label comes from: ``ewq`` (our analysis of a
model available here) or ``paper-table8`` / ``paper-table2`` (the paper's published
selections; their features come from the models' public configs).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from ewq.errors import EwqError, FormatError, SourceNotFoundError
from ewq.fast.features import Features, features_from_config
from ewq.fileio import atomic_write_text
from ewq.types import Precision

__all__ = [
    "COLUMNS",
    "REQUIRED",
    "DatasetError",
    "paper_configs",
    "paper_rows",
    "read_dataset",
    "rows_from_decision",
    "write_dataset",
]

REQUIRED = (
    "model_name",
    "num_blocks",
    "exec_index",
    "num_parameters",
    "quantization_type",
    "quantized",
)
COLUMNS = (*REQUIRED, "label_source")


class DatasetError(EwqError):
    """A dataset file that cannot be used."""


def rows_from_decision(
    features: Features, precision: Mapping[int, Precision], label_source: str = "ewq"
) -> list[dict[str, Any]]:
    """Rows for one analysed model: its features and the EWQ decision per block."""
    rows = []
    for row in features.rows():
        p = precision[int(row["exec_index"])]
        rows.append(
            {
                **row,
                "quantization_type": p.value,
                "quantized": int(p is not Precision.RAW),
                "label_source": label_source,
            }
        )
    return rows


def paper_configs() -> dict[str, dict[str, Any]]:
    """Public config.json values of the paper's models (shipped with ewq)."""
    data = json.loads((files("ewq.fast") / "data" / "paper_configs.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace('"', "").split(",") if x.strip()]


def paper_rows(tables_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Labelled rows from the paper's Table 8 (whole models) and Table 2 (samples).

    Table 8 gives, for four models, the exec_indices EWQ quantized and which of them
    went to 4-bit; every other block of those models is raw. Table 2 rows of other
    models are added as published (their labels), with our feature values.
    """
    tables = Path(tables_dir)
    configs = paper_configs()
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with open(tables / "table8_block_selection.csv", newline="") as fh:
            table8 = [r for r in csv.DictReader(fh) if r["variant"] == "ewq"]
        with open(tables / "table2_dataset_sample.csv", newline="") as fh:
            table2 = list(csv.DictReader(fh))
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"paper table missing: {exc.filename}") from None
    for r in table8:
        name = r["model"]
        quantized = set(_ints(r["quantized_exec_indices_by_priority"]))
        four = set(_ints(r["four_bit_exec_indices"]))
        f = features_from_config(configs[name], name, name)
        for row in f.rows():
            i = int(row["exec_index"])
            p = (
                Precision.Q4
                if i in four
                else Precision.Q8
                if i in quantized
                else Precision.RAW
            )
            rows[(name, i)] = {
                **row,
                "quantization_type": p.value,
                "quantized": int(p is not Precision.RAW),
                "label_source": "paper-table8",
            }
    for r in table2:
        name, i = r["model_name"], int(r["exec_index"])
        if (name, i) in rows or name not in configs:
            continue
        f = features_from_config(configs[name], name, name)
        block = next(b for b in f.blocks if b.exec_index == i)
        rows[(name, i)] = {
            "model_name": name,
            "num_blocks": f.num_blocks,
            "exec_index": i,
            "num_parameters": block.num_parameters,
            "quantization_type": r["quantization_type"],
            "quantized": int(r["quantized"]),
            "label_source": "paper-table2",
        }
    return list(rows.values())


def write_dataset(
    rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]
) -> int:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


_MAX_COUNT = 2**53  # beyond this a count is no model's, and floats lose it


def read_dataset(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a dataset CSV, typed and checked (required columns, labels)."""
    path = Path(path)
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header: Sequence[str] = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = []
            for k, r in enumerate(reader, start=2):
                try:
                    row = {
                        "model_name": r["model_name"],
                        "num_blocks": int(r["num_blocks"]),
                        "exec_index": int(r["exec_index"]),
                        "num_parameters": int(r["num_parameters"]),
                        "quantization_type": Precision(r["quantization_type"]).value,
                        "quantized": int(r["quantized"]),
                        "label_source": r.get("label_source") or "",
                    }
                except (TypeError, ValueError) as exc:
                    raise DatasetError(f"{path}: line {k}: {exc}") from None
                if row["quantized"] not in (0, 1):
                    raise DatasetError(f"{path}: line {k}: quantized must be 0 or 1")
                for key in ("num_blocks", "exec_index", "num_parameters"):
                    if not 0 <= row[key] <= _MAX_COUNT:
                        raise DatasetError(
                            f"{path}: line {k}: {key} {row[key]:.3g} is out of range"
                        )
                rows.append(row)
    except FileNotFoundError:
        raise SourceNotFoundError(f"no such dataset: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(f"{path}: cannot read the dataset ({exc})") from exc
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows")
    models = {r["model_name"] for r in rows}
    if len(models) < 2:
        raise DatasetError(
            f"{path}: rows from {len(models)} model; the study holds one model out at "
            "a time and needs at least 2"
        )
    for label in (0, 1):
        n = sum(1 for r in rows if r["quantized"] == label)
        if n < 2:
            raise DatasetError(
                f"{path}: {n} row(s) with quantized = {label}; a stratified split "
                "needs at least 2 of each"
            )
    return rows
