"""Inputs of evaluation and calibration runs beside the model: its tokenizer and text files.

    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    text = read_text("heldout.txt", "--text")
"""
from __future__ import annotations

from pathlib import Path

from globe.errors import ModelDirError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str | Path) -> bool:
    return Path(directory).is_dir() and any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_dir(model_dir: str | Path) -> str | Path:
    """Where the tokenizer of a model directory is: the directory itself, else (a GloBE output saved without one)
    the source model its globe_config.json records; ModelDirError saying what to pass when neither has one."""
    if has_tokenizer(model_dir) or not Path(model_dir).is_dir():
        return model_dir
    import json
    document = Path(model_dir) / "globe_config.json"
    source = None
    if document.is_file():
        try:
            source = json.loads(document.read_text(encoding="utf-8")).get("source", {}).get("model_dir")
        except (ValueError, AttributeError):
            source = None
    if isinstance(source, str) and has_tokenizer(source):
        return source
    raise ModelDirError(f"no tokenizer in {model_dir}" + (f" nor in its source model {source}" if source else "")
                        + "; pass --tokenizer DIR (the directory of the model it was made from)")


def load_tokenizer(source: str | Path):
    """transformers.AutoTokenizer of a directory (or of the source model a GloBE output records, see
    tokenizer_dir); ModelDirError (one line, what to pass) when there is none."""
    import transformers
    from globe.formats.validate import refuse_remote_code
    source = tokenizer_dir(source)
    if Path(source).is_dir():
        refuse_remote_code(source)                  # custom tokenizer code is never run
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:              # any failure of a user's tokenizer files ends in the same advice
        raise ModelDirError(f"no usable tokenizer in {source} ({type(exc).__name__}); pass --tokenizer DIR") from None
    if len(tokenizer) < 2:
        raise ModelDirError(f"the tokenizer in {source} is empty ({len(tokenizer)} token); pass --tokenizer DIR")
    return tokenizer


def check_text_file(path: str | Path, what: str) -> Path:
    """`path` as a Path; ModelDirError naming the option `what` when it is not a file."""
    if not Path(path).is_file():
        raise ModelDirError(f"{what} file {path} not found; pass an existing text file")
    return Path(path)


def read_text(path: str | Path, what: str, limit: int | None = None) -> str:
    """The text of a --text / --calib file: UTF-8 and not empty, or one error line naming the file."""
    from globe.io.text import read_text as read
    return read(check_text_file(path, what), what, limit)
