"""Reading tool calls out of a model's streamed text, and the grammar that forces one. Pure."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from peerinfer.api.choices import ToolCall
from peerinfer.engine.prompt import HERMES_TOOL_SYNTAX
from peerinfer.engine.tool_calls import (
    ToolCallParser,
    new_tool_call_id,
    rename_rule,
    tool_call_grammar,
    tools_to_render,
)
from peerinfer.errors import RequestError

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"call_{next(counter)}"


def parse(
    deltas: Sequence[str], names: Sequence[str] | None = ("get_weather", "get_time")
) -> tuple[str, list[ToolCall]]:
    parser = ToolCallParser(HERMES_TOOL_SYNTAX, names, new_id=ids())
    shown: list[str] = []
    calls: list[ToolCall] = []
    for delta in [*deltas, None]:
        text, made = parser.finish() if delta is None else parser.feed(delta)
        shown.append(text)
        calls += made
    assert parser.calls == len(calls)
    return "".join(shown), calls


def cuts(text: str, pieces: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, len(text)), min(pieces, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def test_a_call_becomes_a_tool_call_with_an_openai_id_and_json_arguments() -> None:
    parser = ToolCallParser(HERMES_TOOL_SYNTAX, ["get_weather"])
    text, calls = parser.feed(CALL)
    assert text == ""
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert parser.finish() == ("", ())
    assert new_tool_call_id() != new_tool_call_id()


def test_the_marker_split_at_every_point_gives_the_same_call() -> None:
    whole = "Let me check.\n" + CALL
    for cut in range(1, len(whole)):
        assert parse([whole[:cut], whole[cut:]]) == parse([whole]), cut
    text, calls = parse([whole])
    assert text == "Let me check."  # the newline before the call is layout
    assert [call.name for call in calls] == ["get_weather"]


@pytest.mark.parametrize("seed", range(20))
def test_any_cut_of_text_and_calls_gives_the_same_answer(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["Sure. ", CALL, "\n", CALL.replace("Paris", "Pune"), " <tool", "_call is a tag>", "\n\nDone <b>"]
    whole = "".join(rng.choice(pieces) for _ in range(6))
    assert parse(cuts(whole, rng.randint(1, 30), seed)) == parse([whole])


@pytest.mark.parametrize(
    "text",
    ["plain text", "a < b and <tool calls>", "ends with <tool_", "ends with <", "  spaces  \n\n", "", "<tool_cal"],
)
def test_text_without_a_call_comes_out_exactly_as_it_went_in(text: str) -> None:
    for seed in range(5):
        pieces = cuts(text, 4, seed) if len(text) > 1 else [text]
        assert parse(pieces) == (text, [])


def test_two_calls_and_the_whitespace_between_them_are_two_calls_and_no_text() -> None:
    text, calls = parse([CALL + "\n" + CALL.replace("get_weather", "get_time") + "\n"])
    assert text == ""
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    assert [call.id for call in calls] == ["call_1", "call_2"]


def test_text_after_a_call_is_shown_without_the_layout_before_it() -> None:
    assert parse([CALL, "\n\nI will wait for the result.\n"]) == (
        "I will wait for the result.\n",
        parse([CALL])[1],
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}',  # cut short
        '{"name": "delete_everything", "arguments": {}}',  # not offered
        '{"arguments": {}}',
        '{"name": 3, "arguments": {}}',
        '{"name": "get_weather", "arguments": [1]}',
        '{"name": "get_weather", "arguments": "[1]"}',
        '["get_weather"]',
        "[" * 100000,
        "",
    ],
)
def test_what_is_not_a_call_is_shown_as_the_text_it_is(body: str) -> None:
    written = f"Hmm\n<tool_call>{body}</tool_call> ok"
    assert parse([written]) == (written, [])
    assert parse(cuts(written, 7, 1)) == (written, [])


def test_arguments_written_as_a_json_string_are_kept_as_that_json() -> None:
    text, calls = parse(['<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"IST\\"}"}</tool_call>'])
    assert text == ""
    assert calls[0].arguments == '{"zone": "IST"}'


def test_arguments_left_out_are_an_empty_object_and_any_name_passes_without_a_list() -> None:
    text, calls = parse(['<tool_call>{"name": "anything"}</tool_call>'], names=None)
    assert (text, [(call.name, call.arguments) for call in calls]) == ("", [("anything", "{}")])


def test_a_call_that_never_ends_is_text_at_the_finish() -> None:
    written = 'Checking\n<tool_call>\n{"name": "get_weather", "argu'
    assert parse([written]) == (written, [])
    assert parse(cuts(written, 5, 3)) == (written, [])


def test_indic_text_and_arguments_pass_unchanged() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "पुणे"}}</tool_call>'
    text, calls = parse(["मौसम देखते हैं।", call])
    assert text == "मौसम देखते हैं।"
    assert json.loads(calls[0].arguments) == {"city": "पुणे"}


# --- tools_to_render and tool_choice -----------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tool_choice_none_renders_no_tools_and_auto_renders_them() -> None:
    assert tools_to_render([WEATHER], "none") is None
    assert tools_to_render([WEATHER], "auto") == [WEATHER]
    assert tools_to_render([WEATHER], None) == [WEATHER]
    assert tools_to_render(None, None) is None
    assert tools_to_render([], "none") is None


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
        ([WEATHER], {"type": "function"}, "tool_choice"),
        ([WEATHER], "always", "tool_choice"),
        ([], "required", "tool_choice"),
        (None, {"type": "function", "function": {"name": "get_weather"}}, "tool_choice"),
        ([{"type": "function", "function": {}}], "auto", "tools"),
        ([{"type": "retrieval"}], "auto", "tools"),
        ([WEATHER, WEATHER], "auto", "tools"),
    ],
)
def test_bad_tools_and_tool_choices_are_400s_naming_the_field(
    tools: list[dict[str, Any]] | None, choice: Any, param: str
) -> None:
    with pytest.raises(RequestError) as refused:
        tools_to_render(tools, choice)
    assert refused.value.param == param
    if tools:
        with pytest.raises(RequestError):
            tool_call_grammar(HERMES_TOOL_SYNTAX, tools, choice, lambda schema: "root ::= x")


# --- the grammar that forces a call -----------------------------------------------------------------------------


class Converter:
    """Stands in for Engine.json_grammar: records the schema and answers a grammar shaped as llama.cpp's."""

    def __init__(self) -> None:
        self.schemas: list[Mapping[str, Any] | None] = []

    def __call__(self, schema: Mapping[str, Any] | None) -> str:
        self.schemas.append(schema)
        return (
            'root ::= "{" space  (root-kv )? "}" space\n'
            'root- ::= "\\"a root\\"" | "\\"b\\""  # root in a comment\n'
            'root-kv ::= "\\"root\\"" space ":" space root- [root]\n'
            'tool-call ::= "taken"\n'
            'space ::= " "?\n'
        )


@pytest.mark.parametrize("choice", ["auto", "none", None])
def test_no_grammar_unless_a_call_is_required(choice: Any) -> None:
    converter = Converter()
    assert tool_call_grammar(HERMES_TOOL_SYNTAX, [WEATHER], choice, converter) is None
    assert converter.schemas == []


def test_a_named_choice_forces_that_function_with_its_parameters() -> None:
    converter = Converter()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    grammar = tool_call_grammar(HERMES_TOOL_SYNTAX, [TIME, WEATHER], choice, converter)
    assert converter.schemas == [
        {
            "type": "object",
            "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
            "required": ["name", "arguments"],
        }
    ]
    assert grammar is not None
    lines = grammar.splitlines()
    # Its own root: the markers around the converter's root, renamed past a name the grammar already uses.
    assert lines[0] == 'root ::= "<tool_call>\\n" tool-call-1 "\\n</tool_call>"'
    assert lines[1] == 'tool-call-1 ::= "{" space  (root-kv )? "}" space'
    assert 'root- ::= "\\"a root\\"" | "\\"b\\""  # root in a comment' in lines
    assert 'root-kv ::= "\\"root\\"" space ":" space root- [root]' in lines
    assert sum(line.startswith("root ::=") for line in lines) == 1


def test_required_forces_one_of_the_offered_functions_each_with_its_own_parameters() -> None:
    converter = Converter()
    tool_call_grammar(HERMES_TOOL_SYNTAX, [WEATHER, TIME], "required", converter)
    (schema,) = converter.schemas
    assert schema is not None
    alternatives = schema["anyOf"]
    assert [alternative["properties"]["name"] for alternative in alternatives] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    # A function without parameters takes none.
    assert alternatives[1]["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_parameters_the_converter_refuses_are_a_400_on_tools() -> None:
    def refuses(schema: Mapping[str, Any] | None) -> str:
        raise RequestError("response_format.json_schema.schema.minimum: is not supported", param="response_format")

    with pytest.raises(RequestError, match="minimum") as refused:
        tool_call_grammar(HERMES_TOOL_SYNTAX, [WEATHER], "required", refuses)
    assert refused.value.param == "tools"


def test_renaming_a_rule_leaves_literals_classes_and_comments_alone() -> None:
    grammar = 'root ::= "root" [root] root-x x-root root # root\nx ::= root\n'
    assert rename_rule(grammar, "root", "top") == 'top ::= "root" [root] root-x x-root top # root\nx ::= top\n'
    assert rename_rule('a ::= "\\"root\\"" root', "root", "b") == 'a ::= "\\"root\\"" b'
    assert rename_rule('a ::= "unterminated root', "root", "b") == 'a ::= "unterminated root'
