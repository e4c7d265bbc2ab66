"""Tool calls in a model's output (hermes, llama3_json, mistral), parsed whole and streamed in any split;
and the test models' chat templates, which must render tools, calls and results as the parsers read them."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmctl.runtime.server.tool_calls import PARSERS, arguments_as_objects, detect_parser

TEMPLATES = Path(__file__).parent / "templates"
TOOLS = {"get_weather", "add", "search"}
OPENAI_ID, MISTRAL_ID = r"call_[A-Za-z0-9]{24}", r"[A-Za-z0-9]{9}"
ID_SHAPE = {"hermes": OPENAI_ID, "llama3_json": OPENAI_ID, "mistral": MISTRAL_ID}
SAME = "the output as it was"
WEATHER_ZURICH = [("get_weather", {"city": "Zürich"})]
ADD_1 = [("add", {"a": 1})]

# (format, model output, the content left, the calls as (name, arguments object))
EXAMPLES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>', None,
     WEATHER_ZURICH),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Bern"}), ("add", {"a": 1, "b": 2.5})]),
    ("hermes", '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
               '"arguments": {"city": "Zürich"}}\n</tool_call>',
     "<think>\nThe user wants the weather.\n</think>", WEATHER_ZURICH),
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', None, ADD_1),
    ("hermes", '<tool_call>{"name": "search"}</tool_call>\nDone.', "Done.", [("search", {})]),
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": {"deep": [1, {"x": "}{ \\" \\\\"}]}}}\n'
               '</tool_call>', None, [("search", {"q": {"deep": [1, {"x": '}{ " \\'}]}})]),
    ("hermes", 'A <tool_call>{"name": "nope", "arguments": {}}</tool_call> B\n'
               '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
     'A <tool_call>{"name": "nope", "arguments": {}}</tool_call> B', ADD_1),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n', None, ADD_1),
    ("hermes", '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>', SAME, []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>', SAME, []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', SAME, []),
    ("hermes", 'Sure <tool_call>\n{"name": "add", "argu', SAME, []),
    ("hermes", "a <tool b <tool_cal c </tool_call> <", SAME, []),
    ("hermes", "", SAME, []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Zürich"}}', None, WEATHER_ZURICH),
    ("llama3_json", '<|python_tag|>{"name": "add", "arguments": {"a": 1}}', None, ADD_1),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1}}; '
                    '{"name": "search", "parameters": {"q": "x; y"}}', None,
     [*ADD_1, ("search", {"q": "x; y"})]),
    ("llama3_json", '\n\n  {"name": "search", "parameters": {}}', None, [("search", {})]),
    ("llama3_json", '{"name": "add", "parameters": "{\\"a\\": 1}"}', None, ADD_1),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1}}\n\nI called add.', "I called add.", ADD_1),
    ("llama3_json", 'The answer is {"name": "add", "parameters": {}}.', SAME, []),
    ("llama3_json", '{"answer": 42}', SAME, []),
    ("llama3_json", '{"name": "rm", "parameters": {"path": "/"}}', SAME, []),
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather")', SAME, []),
    ("llama3_json", '{"name": "add", "parameters": {"a": ', SAME, []),
    ("llama3_json", "{'name': 'add', 'parameters': {}}", SAME, []),
    ("llama3_json", '{"name": "search", "parameters": {"q": "a \\" ] } [ {"}}', None,
     [("search", {"q": 'a " ] } [ {'})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
                '{"name": "add", "arguments": {"a": 1}}]', None, WEATHER_ZURICH + ADD_1),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}, "id": "abcDEF123"}]', None, ADD_1),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}[TOOL_CALLS]add[ARGS]{"a": 1}', "Sure.",
     WEATHER_ZURICH + ADD_1),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{"city": "Zürich"}'
                '[TOOL_CALLS]search[CALL_ID]xyzXYZ789[ARGS]{"q": "[ARGS]"}', None,
     [*WEATHER_ZURICH, ("search", {"q": "[ARGS]"})]),
    ("mistral", '[TOOL_CALLS]search[ARGS]{"name": "x"}', None, [("search", {"name": "x"})]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 1} and then some words', "and then some words", ADD_1),
    ("mistral", '[TOOL_CALLS] [{"name": "add", "arguments": {}}, {"name": "nope", "arguments": {}}]',
     SAME, []),
    ("mistral", "[TOOL_CALLS] hello there", SAME, []),
    ("mistral", "[TOOL_CALLS]add[ARGS][1, 2]", SAME, []),
    ("mistral", "No tools needed [TOOL", SAME, []),
    ("mistral", '[TOOL_CALLS] [{bad}] text [TOOL_CALLS]add[ARGS]{"a": 1}', "[TOOL_CALLS] [{bad}] text", ADD_1),
]


def as_openai(calls) -> list[tuple[str, str]]:
    return [(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in calls]


def stream(kind: str, pieces: list[str]):
    """(the parser, what feed() gave, what finish() gave)."""
    parser = PARSERS[kind](TOOLS)
    fed = [piece for text in pieces for piece in parser.feed(text)]
    return parser, fed, parser.finish()


def assemble(pieces: list[dict]) -> tuple[str, list[tuple[str, str, str]]]:
    """Streamed pieces added up as a client would: (content, [(id, name, arguments)]); checks their shapes."""
    content, calls = "", []
    for piece in pieces:
        assert len(piece) == 1 and set(piece) <= {"content", "tool_calls"}
        if "content" in piece:
            assert piece["content"]
            content += piece["content"]
            continue
        (delta,) = piece["tool_calls"]
        if "id" in delta:
            assert delta["index"] == len(calls) and delta["type"] == "function"
            assert delta["function"]["arguments"] == ""
            calls.append([delta["id"], delta["function"]["name"], ""])
        else:
            assert delta["index"] == len(calls) - 1 and set(delta) == {"index", "function"}
            calls[-1][2] += delta["function"]["arguments"]
    return content, [tuple(call) for call in calls]


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if text else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def assert_streams_like_parse(kind: str, text: str, splits: list[list[str]]) -> None:
    content, calls = PARSERS[kind](TOOLS).parse(text)
    # A call goes out as soon as its text is complete: only a hermes call never closed waits for finish()
    unclosed = kind == "hermes" and text.rfind("<tool_call>") > text.rfind("</tool_call>")
    for pieces in splits:
        parser, fed, finished = stream(kind, pieces)
        got_content, got_calls = assemble(fed + finished)
        assert unclosed or not any("tool_calls" in piece for piece in finished)
        assert parser.called == bool(calls)
        assert [call[1:] for call in got_calls] == [(c.name, c.arguments) for c in calls]
        assert (got_content or None) == content if calls else got_content == text


@pytest.mark.parametrize("kind,text,content,calls", EXAMPLES)
def test_parse(kind, text, content, calls):
    got_content, got_calls = PARSERS[kind](TOOLS).parse(text)
    assert got_content == (text if content == SAME else content)
    assert [(c.name, c.arguments) for c in got_calls] == as_openai(calls)
    assert all(re.fullmatch(ID_SHAPE[kind], c.id) for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("kind,text,content,calls", EXAMPLES)
def test_stream_in_any_split_adds_up_to_the_whole_parse(kind, text, content, calls):
    rng = random.Random(text)
    assert_streams_like_parse(kind, text, [[text], list(text), *(random_split(text, rng) for _ in range(30))])


def test_stream_holds_back_only_what_may_open_a_call():
    parser = PARSERS["hermes"](TOOLS)
    assert parser.feed("Hi <tool") == [{"content": "Hi"}]
    assert parser.feed("box> and \n") == [{"content": " <toolbox> and"}]
    assert parser.feed("<tool_call>\n") == []
    assert parser.feed('{"name": "add", "arguments": {"a": 1}}\n</tool_') == [] and not parser.called
    out = parser.feed("call>\n")
    call_id = parser.calls[0].id
    assert out == [{"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                    "function": {"name": "add", "arguments": ""}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}]
    assert parser.finish() == [] and parser.called


def test_finish_flushes_what_was_held():
    parser = PARSERS["hermes"](TOOLS)
    assert parser.feed("Hi \n<tool_") == [{"content": "Hi"}]
    assert parser.finish() == [{"content": " \n<tool_"}] and not parser.called
    parser = PARSERS["llama3_json"](TOOLS)
    assert parser.feed('  {"name": "add", "parameters": {"a"') == []
    assert parser.finish() == [{"content": '  {"name": "add", "parameters": {"a"'}]


def test_start_markers():
    assert {kind: parser.start_marker for kind, parser in PARSERS.items()} == {
        "hermes": "<tool_call>", "llama3_json": "", "mistral": "[TOOL_CALLS]"}


# -- any arguments, any content before, any split ---------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
ARGUMENTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
CALLS = st.lists(st.tuples(st.sampled_from(sorted(TOOLS)), ARGUMENTS), min_size=1, max_size=3)


def render(kind: str, calls, prefix: str, style) -> str:
    dumps = {"compact": lambda o: json.dumps(o, separators=(",", ":")), "ascii": json.dumps,
             "unicode": lambda o: json.dumps(o, ensure_ascii=False)}[style]
    if kind == "hermes":
        return prefix + "".join(f"\n<tool_call>\n{dumps({'name': n, 'arguments': a})}\n</tool_call>"
                                for n, a in calls)
    if kind == "llama3_json":
        return "; ".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    if style == "compact":
        return prefix + "".join(f"[TOOL_CALLS]{n}[ARGS]{dumps(a)}" for n, a in calls)
    return prefix + "[TOOL_CALLS] " + dumps([{"name": n, "arguments": a} for n, a in calls])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(PARSERS)), calls=CALLS, prefix=st.text(max_size=20),
       style=st.sampled_from(["compact", "ascii", "unicode"]), rng=st.randoms(use_true_random=False))
def test_any_calls_parse_and_stream_alike(kind, calls, prefix, style, rng):
    prefix = "" if kind == "llama3_json" else prefix
    text = render(kind, calls, prefix, style)
    if kind == "hermes":
        assume("<tool_call>" not in prefix and text.count("</tool_call>") == len(calls))
    if kind == "mistral":
        assume("[TOOL_CALLS]" not in prefix)
    content, got = PARSERS[kind](TOOLS).parse(text)
    assert content == (prefix.rstrip() or None)
    assert [(c.name, c.arguments) for c in got] == as_openai(calls)
    assert_streams_like_parse(kind, text, [list(text), random_split(text, rng), random_split(text, rng)])


# -- the test models' chat templates ------------------------------------------------------------------------

# The tokens each template writes, as the real models' tokenizers have them: special tokens (which a decode
# with skip_special_tokens drops), and plain added tokens (which it keeps), then BOS and EOS.
TOKENS = {
    "hermes": (["<|im_start|>", "<|im_end|>"],
               ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"], None, "<|im_end|>"),
    "llama3_json": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<|eom_id|>", "<|python_tag|>"], [], "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                 "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[ARGS]", "[CALL_ID]"],
                [], "<s>", "</s>"),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# What each template writes for the call below, and for its result
CALL_TEXT = {
    "hermes": ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}'
               '\n</tool_call><|im_end|>',
               '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>'),
    "llama3_json": ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                    '{"city": "Zürich"}}<|eot_id|>',
                    '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp\\": 20}"<|eot_id|>'),
    "mistral": ('[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}, '
                '"id": "abcDEF123"}]</s>',
                '[TOOL_RESULTS] {"content": {"temp": 20}, "call_id": "abcDEF123"}[/TOOL_RESULTS]'),
}
GENERATION_PROMPT = {"hermes": "<|im_start|>assistant\n", "mistral": "[/TOOL_RESULTS]",
                     "llama3_json": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def conversation(arguments, call_id: str = "abcDEF123") -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 20}'}]


@functools.cache
def tokenizer_for(kind: str):
    """A tiny tokenizer carrying the format's test template and its tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, plain, bos, eos = TOKENS[kind]
    template = (TEMPLATES / f"{kind}.jinja").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([template], trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = template
    return fast


@pytest.fixture(params=sorted(TOKENS))
def templated(request):
    return request.param, tokenizer_for(request.param)


def apply(tokenizer, messages, **options) -> str:
    return tokenizer.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True,
                                         tokenize=False, **options)


def test_template_renders_tools_calls_and_results(templated):
    kind, tokenizer = templated
    text = apply(tokenizer, conversation({"city": "Zürich"}))
    assert '"name": "get_weather"' in text.split("What is the weather")[0]  # the tools come before it
    assert "Answer briefly." in text
    call, result = CALL_TEXT[kind]
    assert call in text and result in text
    assert text.endswith(GENERATION_PROMPT[kind])
    assert detect_parser(tokenizer.chat_template) == kind


def test_a_rendered_call_parses_back(templated):
    kind, tokenizer = templated
    text = apply(tokenizer, conversation({"city": "Zürich", "days": [1, 2]}))
    turn = {"hermes": r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>",
            "llama3_json": r"assistant<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
            "mistral": r"\[/INST\](.*?)</s>"}[kind]
    content, calls = PARSERS[kind](TOOLS).parse(re.search(turn, text, re.DOTALL)[1])
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Zürich", "days": [1, 2]})]


def test_string_arguments_must_be_decoded_before_rendering(templated):
    """Like the real templates (Qwen2.5, Llama 3.1, Mistral v0.3), these tojson the arguments: OpenAI's JSON
    text renders as one quoted string, unlike anything the model wrote. arguments_as_objects decodes it."""
    kind, tokenizer = templated
    as_text = conversation(json.dumps({"city": "Zürich"}, ensure_ascii=False))
    assert '"{\\"city\\": \\"Zürich\\"}"' in apply(tokenizer, as_text)
    as_object = conversation({"city": "Zürich"})
    assert apply(tokenizer, arguments_as_objects(as_text)) == apply(tokenizer, as_object)
    assert as_text[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Zürich"}'  # a copy was changed


def test_markers_are_single_tokens_and_mistrals_vanish_when_special_tokens_are_skipped(templated):
    kind, tokenizer = templated
    marker = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}[kind]
    ids = tokenizer.encode(marker + '{"a": 1}', add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids(marker)
    kept = tokenizer.decode(ids, skip_special_tokens=True).startswith(marker)
    assert kept == (kind == "hermes")  # so a mistral model's output must be decoded with special tokens kept


def test_mistral_template_wants_ids_of_nine_characters():
    tokenizer = tokenizer_for("mistral")
    with pytest.raises(Exception, match="length 9"):
        apply(tokenizer, conversation({"city": "Zürich"}, call_id="call_0123456789abcdef01234567"))
    call_id = PARSERS["mistral"](TOOLS).parse('[TOOL_CALLS]add[ARGS]{"a": 1}')[1][0].id
    assert apply(tokenizer, conversation({"city": "Zürich"}, call_id=call_id))


def test_llama_template_takes_one_call_per_turn():
    tokenizer = tokenizer_for("llama3_json")
    messages = conversation({"city": "Zürich"})
    messages[2]["tool_calls"] *= 2
    with pytest.raises(Exception, match="single tool-calls"):
        apply(tokenizer, messages)


@pytest.mark.parametrize("template,kind", [
    (None, None), ("", None),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", None),
    ("{{- '<tool_call>' }}", "hermes"), ("{{- '[TOOL_CALLS] [' }}", "mistral"),
    ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
    ("'{\"name\": \"' + n + '\", \"parameters\": '", "llama3_json"),
])
def test_detect_parser(template, kind):
    assert detect_parser(template) == kind


def test_arguments_as_objects_leaves_what_is_not_a_json_object():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [
                    {"id": "a", "function": {"name": "f", "arguments": "not json"}},
                    {"id": "b", "function": {"name": "f", "arguments": "[1]"}},
                    {"id": "c", "function": {"name": "f", "arguments": {"x": 1}}},
                    {"id": "d", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    got = arguments_as_objects(messages)
    assert got[0] is messages[0]
    assert [c["function"]["arguments"] for c in got[1]["tool_calls"]] == ["not json", "[1]", {"x": 1},
                                                                           {"x": 1}]
