"""The examples a user copies from must run."""

import runpy
import sys

import pytest

EXAMPLES = ["examples/compile_and_inspect.py", "examples/bisect_a_bad_pass.py"]


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_runs(path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [path])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()
    if "bisect" in path:
        assert "first diverging pass" in out and "break-rsqrt" in out
    else:
        assert "max |compiled - eager| = 0.00e+00" in out and "CausalLMOutputWithCrossAttentions" in out
