"""The examples a user copies from must run."""

import runpy
import sys

import pytest

EXAMPLES = ["examples/compile_and_inspect.py", "examples/bisect_a_bad_pass.py", "examples/serve_with_prefix_cache.py",
            "examples/speculative_decoding.py", "examples/quantize_and_export.py", "examples/parallel_generate.py"]


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_runs(path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [path])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()
    if "bisect" in path:
        assert "first diverging pass" in out and "break-rsqrt" in out
    elif "prefix_cache" in path:
        assert out.count("48 prompt tokens from the prefix cache") == 2  # the questions after the first
    elif "speculative" in path:
        assert out.count("same tokens as plain: True") == 4  # prompt lookup (lockstep, asynchronous), draft model,
        # seeded sampling with prompt lookup
    elif "parallel" in path:
        assert out.count("same tokens as one device: True") == 2
    elif "quantize" in path:
        assert "quantized linears: 42" in out and "42 MatMulNBits" in out
    else:
        assert "max |compiled - eager| = 0.00e+00" in out and "CausalLMOutputWithCrossAttentions" in out
