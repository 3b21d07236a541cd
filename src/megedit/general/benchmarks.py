"""The five benchmarks of the paper's Table 3, by name: their items and the files they are read from."""

from __future__ import annotations

from pathlib import Path

from megedit.general import bbh, glue, gsm8k, mmlu
from megedit.general.items import Item

BENCHMARKS = ("bbh", "gsm8k", "mmlu", "rte", "sst2")  # Table 3's order
TITLES = {"bbh": "BBH", "gsm8k": "GSM8K", "mmlu": "MMLU", "rte": "RTE", "sst2": "SST-2"}
_FILES = {"bbh": ("general/bbh", "**/*"), "gsm8k": ("general/gsm8k", "test.jsonl"),
          "mmlu": ("general/mmlu", "*/*.csv"), "rte": ("general/rte", "val.jsonl"), "sst2": ("general/sst2", "dev.tsv")}


def check_names(names) -> list[str]:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    return list(names)


def load_benchmark(name: str, data_root: Path, bbh_prompting: str = "answer_only") -> list[Item]:
    """Every item of one benchmark, in file order."""
    if name == "bbh":
        return bbh.load(data_root, bbh_prompting)
    loaders = {"gsm8k": gsm8k.load, "mmlu": mmlu.load, "rte": glue.load_rte, "sst2": glue.load_sst2}
    return loaders[check_names([name])[0]](data_root)


def benchmark_files(name: str, data_root: Path) -> dict[str, Path]:
    """``{path relative to the data folder: path}`` of the files a benchmark reads (for the manifest's hashes)."""
    folder, pattern = _FILES[name]
    root = Path(data_root)
    return {str(p.relative_to(root)): p for p in sorted((root / folder).glob(pattern))
            if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".tsv", ".txt")}
