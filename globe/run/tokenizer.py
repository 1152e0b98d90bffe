"""Inputs of evaluation and calibration runs beside the model: its tokenizer and text files.

    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    text = read_text("heldout.txt", "--text")
"""
from __future__ import annotations

from pathlib import Path

from globe.errors import ModelDirError


def load_tokenizer(source: str | Path):
    """transformers.AutoTokenizer of a directory; ModelDirError (one line, what to pass) when there is none."""
    import transformers
    from globe.formats.validate import refuse_remote_code
    if Path(source).is_dir():
        refuse_remote_code(source)                  # custom tokenizer code is never run
    try:
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:              # any failure of a user's tokenizer files ends in the same advice
        raise ModelDirError(f"no usable tokenizer in {source} ({type(exc).__name__}); pass --tokenizer DIR") from None


def check_text_file(path: str | Path, what: str) -> Path:
    """`path` as a Path; ModelDirError naming the option `what` when it is not a file."""
    if not Path(path).is_file():
        raise ModelDirError(f"{what} file {path} not found; pass an existing text file")
    return Path(path)


def read_text(path: str | Path, what: str, limit: int | None = None) -> str:
    """The text of a --text / --calib file: UTF-8 and not empty, or one error line naming the file."""
    from globe.io.text import read_text as read
    return read(check_text_file(path, what), what, limit)
