import dataclasses

import pytest
import torch
from kiln_testing import HF_MODELS

import kiln
from kiln.models import from_preset

LENGTHS = (1, 2, 7, 33)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_transformers_models_match_eager_at_many_lengths(name: str) -> None:
    model = HF_MODELS[name]()
    compiled = kiln.compile(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    for tokens in LENGTHS:  # one capture serves every length
        ids = torch.randint(0, 128, (1, tokens))
        out = compiled(input_ids=ids)
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False)
        assert type(out) is type(want)  # the HF ModelOutput structure is kept
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
        compiled_positional = compiled(ids)
        torch.testing.assert_close(compiled_positional.logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_kiln_models_match_eager_at_many_lengths(preset: str) -> None:
    model = from_preset(preset).eval()
    vocab = model.config.vocab_size
    compiled = kiln.compile(model, (torch.randint(0, vocab, (1, 8)),))
    for tokens in LENGTHS:
        ids = torch.randint(0, vocab, (1, tokens))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    # position_ids as a second input, captured dynamic too
    pos_model = kiln.compile(model, (torch.randint(0, vocab, (1, 8)), torch.arange(8)[None]))
    ids, pos = torch.randint(0, vocab, (1, 5)), torch.arange(10, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(pos_model(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)


def test_compile_never_mutates_the_model() -> None:
    model = HF_MODELS["llama"]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kiln.compile(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_stats_ir_and_counts() -> None:
    compiled = kiln.compile(HF_MODELS["gpt2"](), {"input_ids": torch.randint(0, 128, (1, 8))})
    assert compiled.stats["canonicalize"]["linears_formed"] == 2 * 4  # c_attn, c_proj, c_fc, c_proj per layer
    assert "seconds" in compiled.stats["canonicalize"]
    counts = compiled.node_counts()
    assert counts["aten.linear"] == 2 * 4 + 1 and "aten.addmm" not in counts
    assert compiled.ir.startswith("graph(%input_ids: i64[1, T]")
    assert "canonicalize" in compiled.summary()


def test_disable_and_print_ir_after(capsys: pytest.CaptureFixture[str]) -> None:
    config = kiln.CompileConfig(disable=("canonicalize", "fuse-attention"), print_ir_after=("eliminate-dead-code",))
    compiled = kiln.compile(HF_MODELS["llama"](layers=1), {"input_ids": torch.randint(0, 128, (1, 8))}, config=config)
    assert "canonicalize" not in compiled.stats
    assert "aten._assert_tensor_metadata" in compiled.ir  # canonicalize did not run
    printed = capsys.readouterr().out
    assert "IR after eliminate-dead-code" in printed and "IR after fold-constants" not in printed
    with pytest.raises(kiln.KilnError, match="unknown pass"):
        kiln.compile(HF_MODELS["llama"](layers=1), {"input_ids": torch.randint(0, 128, (1, 8))},
                     config=kiln.CompileConfig(disable=("no-such-pass",)))


def test_dump_writes_numbered_files_and_html(tmp_path) -> None:
    compiled = kiln.compile(HF_MODELS["gpt2"](layers=1), {"input_ids": torch.randint(0, 128, (1, 8))})
    out = compiled.dump(tmp_path / "dump")
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == "000_input.txt" and "001_canonicalize.txt" in names and "index.html" in names
    page = (out / "index.html").read_text()
    assert "canonicalize" in page and "diff_add" in page
    assert (out / "001_canonicalize.txt").read_text().count("aten.addmm") == 0
    assert (out / "000_input.txt").read_text().count("aten.addmm") == 4


def test_call_convention_errors() -> None:
    compiled = kiln.compile(HF_MODELS["llama"](layers=1), {"input_ids": torch.randint(0, 128, (1, 8))})
    with pytest.raises(kiln.ConfigError, match="differs from the compiled constant"):
        compiled(input_ids=torch.randint(0, 128, (1, 4)), use_cache=True)
    with pytest.raises(kiln.ConfigError, match="missing input 'input_ids'"):
        compiled()


def test_backend_errors_are_explicit() -> None:
    with pytest.raises(kiln.ConfigError, match="not built yet"):
        kiln.compile(HF_MODELS["llama"](layers=1), {"input_ids": torch.randint(0, 128, (1, 8))},
                     config=kiln.CompileConfig(backend="onnx"))
    with pytest.raises(kiln.ConfigError, match="unknown backend"):
        kiln.CompileConfig(backend="tpu") and kiln.compile(torch.nn.Linear(2, 2), (torch.randn(2, 2),),
                                                            config=kiln.CompileConfig(backend="tpu"))
    cfg = dataclasses.replace(kiln.CompileConfig(), verify=True)
    assert cfg.verify_each
