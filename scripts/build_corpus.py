"""Build the text corpus for GloBE's embedded default model.

The corpus is the reStructuredText source of Python's documentation, as shipped
by Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``).
The split is deterministic and made by *file*: the file list is sorted, and every
file whose sorted index satisfies ``index % modulus == remainder`` is held out for
validation. Documents are joined with an ``<|endoftext|>`` separator.

Outputs:
    * ``corpus/train.txt`` -- the training split (not committed).
    * ``globe/assets/globe-tiny-moe/heldout.txt`` -- the first ``--heldout-max-kb``
      kilobytes of the validation split, cut at a line boundary (committed).
    * with ``--calib-out``, a calibration split disjoint from both: the files whose index satisfies
      ``index % modulus == calib_remainder`` (also cut to ``--heldout-max-kb``), taken out of training.

Other document trees work too (``--source``, ``--glob``); the evaluation models use this script with
other sources and output paths (see ``scripts/train_scratch_moe.py``, ``scripts/train_upcycled_moe.py``).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

LOG = logging.getLogger("build_corpus")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
DOC_SEPARATOR = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help="directory holding the *.rst.txt documentation sources (default: %(default)s)")
    p.add_argument("--train-out", type=Path, default=REPO_ROOT / "corpus" / "train.txt",
                   help="where to write the training split (default: %(default)s)")
    p.add_argument("--heldout-out", type=Path,
                   default=REPO_ROOT / "globe" / "assets" / "globe-tiny-moe" / "heldout.txt",
                   help="where to write the held-out split (default: %(default)s)")
    p.add_argument("--modulus", type=int, default=20,
                   help="files with sorted index %% MODULUS == REMAINDER are held out (default: %(default)s)")
    p.add_argument("--remainder", type=int, default=7,
                   help="see --modulus (default: %(default)s)")
    p.add_argument("--heldout-max-kb", type=int, default=300,
                   help="keep at most this many KiB of held-out (and calibration) text (default: %(default)s)")
    p.add_argument("--glob", default="*.rst.txt", help="pattern of the source files under --source (default: %(default)s)")
    p.add_argument("--calib-out", type=Path, default=None,
                   help="also write a calibration split here (default: none, all other files train)")
    p.add_argument("--calib-remainder", type=int, default=13,
                   help="with --calib-out: files with sorted index %% MODULUS == this are calibration (default: %(default)s)")
    return p.parse_args(argv)


def list_sources(source: Path, pattern: str = "*.rst.txt") -> list[Path]:
    """Return the documentation source files, sorted by their path relative to ``source``."""
    files = sorted(source.rglob(pattern), key=lambda f: f.relative_to(source).as_posix())
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {source}; is the package that ships them installed?")
    return files


def read_doc(path: Path) -> str:
    """Read one document, normalising line endings and stripping trailing blank space."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.replace("\r\n", "\n").strip() + "\n"


def join_docs(paths: list[Path]) -> str:
    """Concatenate documents, separated by the end-of-text marker on its own line."""
    return f"\n{DOC_SEPARATOR}\n".join(read_doc(p) for p in paths)


def truncate_at_line(text: str, max_bytes: int) -> str:
    """Return the longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes that ends a line."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes].rfind(b"\n")
    return data[: cut + 1 if cut >= 0 else max_bytes].decode("utf-8", errors="ignore")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8, Unix newlines), creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    LOG.info("wrote %s (%d bytes)", path, len(text.encode("utf-8")))


def main(argv: list[str] | None = None) -> None:
    """Build the train and held-out files."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    files = list_sources(args.source, args.glob)
    calib_rem = args.calib_remainder if args.calib_out is not None else None
    if calib_rem == args.remainder:
        raise ValueError("--calib-remainder must differ from --remainder (the splits must be disjoint)")
    val = [f for i, f in enumerate(files) if i % args.modulus == args.remainder]
    calib = [f for i, f in enumerate(files) if i % args.modulus == calib_rem]
    train = [f for i, f in enumerate(files) if i % args.modulus not in (args.remainder, calib_rem)]
    LOG.info("found %d source files under %s: %d train, %d validation",
             len(files), args.source, len(train), len(val))
    train_text, val_text = join_docs(train), join_docs(val)
    n_train, n_val = len(train_text.encode("utf-8")), len(val_text.encode("utf-8"))
    LOG.info("train %.2f MB, validation %.2f MB (%.1f%% of bytes held out)",
             n_train / 1e6, n_val / 1e6, 100.0 * n_val / (n_train + n_val))
    heldout = truncate_at_line(val_text, args.heldout_max_kb * 1024)
    if len(heldout) < len(val_text):
        LOG.info("held-out text truncated to its first %d KiB", args.heldout_max_kb)
    write_text(args.train_out, train_text)
    write_text(args.heldout_out, heldout)
    if args.calib_out is not None:
        LOG.info("calibration: %d files", len(calib))
        write_text(args.calib_out, truncate_at_line(join_docs(calib), args.heldout_max_kb * 1024))


if __name__ == "__main__":
    main()
