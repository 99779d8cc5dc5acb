from kiln.runtime import StopMatch, find_stop_string


def test_finds_the_earliest_stop_string() -> None:
    assert find_stop_string("hello world. bye", ["bye", "."]) == StopMatch(11, ".")
    assert find_stop_string("hello", ["x", "yz"]) is None
    assert find_stop_string("hello", []) is None
    assert find_stop_string("a<|end|>", ["<|", "<|end|>"]) == StopMatch(1, "<|end|>")  # tie: longest


def test_incremental_search_finds_a_stop_split_across_steps() -> None:
    text = ""
    found = None
    for delta in ["The answer", " is 4", "2\n\nQue", "stion: next"]:
        text += delta
        found = find_stop_string(text, ["\n\nQuestion:"], new_text_len=len(delta))
        if found:
            break
    assert found == StopMatch(16, "\n\nQuestion:") and text[: found.index] == "The answer is 42"
    # an old occurrence outside the window is not reported again
    assert find_stop_string("END and more", ["END"], new_text_len=4) is None
