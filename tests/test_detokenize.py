"""The incremental detokenizer (inference/detokenize.py), without an engine: the streamed deltas
add up to the run's text, a character split across ids waits for its last byte, stop strings cut."""

from __future__ import annotations

from mixmodal.inference.detokenize import IncrementalDetokenizer


class Bytes:
    """A byte-level tokenizer: id = one UTF-8 byte (invalid sequences decode to U+FFFD)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stops=()):
    run = IncrementalDetokenizer(Bytes())
    deltas, stopped = [], False
    for b in text.encode():
        delta, stopped = run.stop_at(stops, run.add(b))
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(run.flush())
    return run, deltas


def test_deltas_add_up_to_the_text_and_a_split_character_waits_for_its_last_byte():
    text = "héllo ☃ wörld"
    run, deltas = stream(text)
    assert "".join(deltas) == run.text == text
    snowman = text.encode().index("☃".encode())
    assert deltas[snowman:snowman + 3] == ["", "", "☃"]  # three bytes, one character, streamed once whole
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_cuts_the_text_where_it_begins_and_nothing_after_it_streams():
    run, deltas = stream("answer: four\n\nQuestion: next", stops=["\n\n"])
    assert run.text == "answer: four"
    # the stop's first character was streamed before the stop was whole (no hold-back of partial matches)
    assert "".join(deltas) == "answer: four\n"
    assert run.flush() == ""  # a cut run holds nothing back


def test_flush_streams_what_the_decoder_held_back():
    run = IncrementalDetokenizer(Bytes())
    assert run.add(ord("a")) == "a"
    assert run.add("é".encode()[0]) == ""  # half a character
    assert run.flush() == "\ufffd"  # the run ended inside it: the decoder's replacement, as decode() gives
    assert run.text == "a\ufffd" == run.emitted
