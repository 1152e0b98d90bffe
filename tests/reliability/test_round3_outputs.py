"""Round three, class 5: every output follows globe.core.outputs: never an input (even with --overwrite), never
replaced without --overwrite."""
from __future__ import annotations

from tests.reliability.battery import EVAL
from tests.reliability.round3 import Round3, assert_refused, snapshot


def test_bench_json_never_an_input_nor_replaced(tmp_path, round3_base, capsys):
    env = Round3.build(tmp_path, round3_base)
    bench = ["bench", str(env.comp), "--modes", "factored", "--text", str(env.text), *EVAL, "--no-original"]
    before = snapshot(env.tmp)
    code, err = env.cli(capsys, *bench, "-o", str(env.text), "--overwrite")
    assert_refused(code, err, str(env.text), "input")
    (tmp_path / "mine.json").write_text("{}")
    before = snapshot(env.tmp)
    code, err = env.cli(capsys, *bench, "-o", str(tmp_path / "mine.json"))
    assert_refused(code, err, "mine.json", "--overwrite")
    assert snapshot(env.tmp) == before
