"""benchmarks.report: a report starts with the options (but those left out), the machine and no models."""
import argparse

import torch

from benchmarks.report import new_report


def test_new_report_keeps_the_options_but_those_left_out():
    args = argparse.Namespace(out="x.json", models=["m"], cut=0.35)
    report = new_report(args, ("out", "models"))
    assert report["settings"] == {"cut": 0.35} and report["models"] == []
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["threads"] == torch.get_num_threads()
    assert new_report(args)["settings"] == {"models": ["m"], "cut": 0.35}
