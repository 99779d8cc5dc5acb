import dataclasses

import pytest

from kiln.errors import ConfigError
from kiln.runtime import (
    Logprob,
    Request,
    RequestStatus,
    SamplingParams,
)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be a number >= 0"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("top_k", -2, "top_k must be an int >= 1, or 0 / -1"),
        ("top_k", 2.5, "top_k"),
        ("min_p", -0.01, "min_p must be in [0, 1]"),
        ("min_p", 1.01, "min_p"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("max_tokens", 0, "max_tokens must be an int >= 1"),
        ("max_tokens", True, "max_tokens"),
        ("n", 0, "n must be an int >= 1"),
        ("seed", 1.5, "seed must be an int or None"),
        ("logprobs", -1, "logprobs must be None or an int >= 0"),
        ("stop", ["ok", ""], "stop must be a non-empty string"),
        ("stop_token_ids", [3, -1], "stop_token_ids must be non-negative"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"SamplingParams\.{field}") as e:
        SamplingParams(**{field: value})
    assert message in str(e.value)
    assert repr(value) in str(e.value)  # the message shows what was given


def test_sampling_params_accepts_edges_and_normalizes_sequences() -> None:
    p = SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, seed=0, logprobs=0,
                       stop="###", stop_token_ids=[7, 8])
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (7, 8)
    assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)
    assert not SamplingParams(temperature=0.7, top_k=0).greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    # derived with dataclasses.replace, validated again
    with pytest.raises(ConfigError):
        dataclasses.replace(p, top_p=0)
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]  (keyword-only)


def test_request_tokens_and_slices() -> None:
    r = Request(request_id="a", prompt_token_ids=(5, 6, 7), sampling_params=SamplingParams())
    r.output_token_ids += [8, 9]
    assert r.all_token_ids == [5, 6, 7, 8, 9] and r.num_tokens == 5 and r.num_prompt_tokens == 3
    for start in range(6):
        for stop in range(start, 6):
            assert r.token_slice(start, stop) == r.all_token_ids[start:stop]
    r.spec_token_ids = [1, 2]
    assert r.num_tokens_with_spec == 7
    assert r.status is RequestStatus.WAITING and not r.is_finished
    assert r != Request(request_id="a", prompt_token_ids=[5, 6, 7])  # identity equality


def test_request_output_snapshot_and_finish_reasons() -> None:
    r = Request(request_id="a", prompt_token_ids=[1, 2], sampling_params=SamplingParams(logprobs=1))
    r.output_token_ids += [3, 4]
    r.output_logprobs += [{3: Logprob(-0.5, 1)}, {4: Logprob(-1.25, 2), 9: Logprob(-0.1, 1)}]
    out = r.to_output(text="xy", prompt="p")
    assert not out.finished and out.outputs[0].finish_reason is None
    assert out.outputs[0].cumulative_logprob == pytest.approx(-1.75)
    r.output_token_ids.append(5)
    assert out.outputs[0].token_ids == [3, 4]  # a copy, not a view
    r.status = RequestStatus.FINISHED_LENGTH
    assert r.to_output().outputs[0].finish_reason == "length" and r.to_output().finished
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.PREEMPTED.finish_reason is None and not RequestStatus.PREEMPTED.is_finished
    assert Request(request_id="b", prompt_token_ids=[1]).to_output().outputs[0].logprobs is None
