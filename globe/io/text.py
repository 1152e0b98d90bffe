"""Text files given on the command line (--text, --calib): read as UTF-8, with one clear error line naming the file.

    text = read_text(path, "--text")     # ConfigError if missing, a directory, not UTF-8, or empty
"""
from __future__ import annotations

from pathlib import Path

from globe.errors import ConfigError, ModelDirError


def read_text(path: str | Path, flag: str = "--text", limit: int | None = None) -> str:
    """The text of `path` (at most `limit` characters); errors name the file and the option it came from."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{flag} file {path} not found; pass an existing text file")
    try:
        with path.open(encoding="utf-8") as fh:
            text = fh.read(limit) if limit else fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} near offset "
                          f"{exc.start}); convert it to UTF-8, e.g. with iconv -t UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} file {path} ({exc.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{flag} file {path} is empty; pass a file with text in it")
    return text
