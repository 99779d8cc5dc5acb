from kiln.cli import main


def test_compile_prints_table_checks_and_dumps(tmp_path, capsys) -> None:
    dump = tmp_path / "dumps"
    assert main(["compile", "llama-tiny", "--dump-dir", str(dump), "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize" in out and "eliminate-dead-code" in out
    assert "max |compiled - eager| = 0" in out
    assert (dump / "index.html").exists() and (dump / "000_input.txt").exists()


def test_ir_command_prints_ir(capsys) -> None:
    assert main(["ir", "gpt2-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph(%input_ids: i64[1, T]") and "aten.linear(" in out
    assert main(["ir", "llama-tiny", "--captured"]) == 0
    captured = capsys.readouterr().out
    assert captured.startswith("graph(%input_ids: i64[1, T]") and "// weights:" in captured


def test_bad_model_is_a_clear_error(capsys) -> None:
    assert main(["compile", "no-such-model"]) == 1
    out = capsys.readouterr().out
    assert "neither a folder nor a preset" in out


def test_list_presets(capsys) -> None:
    assert main(["compile", "--list-presets"]) == 0
    assert "llama-8b" in capsys.readouterr().out


def test_generate_streams_text_from_the_shipped_teacher(capsys) -> None:
    assert main(["generate", "models/kiln-teacher", "def read_config(path):", "--max-tokens", "6", "--stream"]) == 0
    out = capsys.readouterr().out
    assert "6 tokens in" in out and "steps" in out


def test_generate_speculates_with_a_draft_model(capsys) -> None:
    args = ["generate", "models/kiln-teacher", "def read_config(path):", "--max-tokens", "12", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "models/kiln-drafter", "--num-speculative-tokens", "3"]) == 0
    spec = capsys.readouterr().out
    assert "acceptance" in spec and "tokens per verified step" in spec
    text = [line for line in plain.splitlines() if line.startswith("def read_config")]
    assert text and text == [line for line in spec.splitlines() if line.startswith("def read_config")]  # greedy


def test_generate_several_completions(capsys) -> None:
    args = ["generate", "models/kiln-teacher", "def main():", "--max-tokens", "5", "--device", "cpu",
            "--temperature", "1.0", "--seed", "3", "--n", "3"]  # fmt: skip
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(completion 2)" in out and "15 tokens in" in out


def test_generate_quantized_and_sharded_over_two_ranks(capsys) -> None:
    args = ["generate", "models/kiln-teacher", "def read_config(path):", "--max-tokens", "10", "--device", "cpu",
            "--quant", "w8a16"]  # fmt: skip
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main([*args, "--tensor-parallel-size", "2"]) == 0
    two = capsys.readouterr().out
    text = [line for line in one.splitlines() if line.startswith("def read_config")]
    assert text and text == [line for line in two.splitlines() if line.startswith("def read_config")]  # greedy
    assert main([*args[:-1], "w4a16-g128", "--tensor-parallel-size", "2"]) == 1  # 192 inputs a rank: 1.5 groups
    out = " ".join(capsys.readouterr().out.split())  # the console may wrap lines anywhere
    assert "whole groups" in out and "PassError: (rank" in out and "Traceback" not in out  # kiln's error, either rank


def test_generate_torch_compile_on_the_cpu_is_a_clear_error(capsys) -> None:
    args = ["generate", "models/kiln-teacher", "hello", "--max-tokens", "2", "--device", "cpu", "--torch-compile"]
    assert main(args) == 1
    assert "torch_compile" in capsys.readouterr().out  # it needs CUDA graphs on a GPU: said, not ignored


def test_eval_reports_perplexity_and_agreement(capsys) -> None:
    assert main(["eval", "models/kiln-teacher", "--draft", "models/kiln-drafter", "--max-tokens", "1100",
                 "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "eval perplexity" in out and "top-1 agreement of draft with target" in out
